"""FSDP (accelerate's FSDP2 plugin) on 2 CPU processes over gloo, launched with the shipped accelerate config:
the same losses and weights as one process with the same global batch, checkpoints that any engine resumes, and
a clear error for what FSDP and DeepSpeed refuse."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sentiment_rows, write_jsonl
from safetensors.torch import load_file
from test_distributed import _args, _free_port, _losses

from preflab.config import ConfigError, load_config
from preflab.train.checkpoint import list_checkpoints
from preflab.train.engine import check_engine
from preflab.train.loop import train

FSDP_CONFIG = Path(__file__).parents[2] / "configs" / "accelerate" / "fsdp.yaml"
WEIGHTS = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}


def _accelerate_launch(config: Path, args: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", str(config),
           "--main_process_port", str(_free_port()), "-m", "preflab.cli", "train", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # a collective out of step hangs
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.mark.parametrize(("kind", "reference_cache"), [("lora", "lazy"), ("full", "precompute")])
def test_two_process_fsdp_equals_one_process_and_its_checkpoints_resume_anywhere(tiny_model_dir, tmp_path, kind,
                                                                                 reference_cache):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(11))
    extra = [f"data.eval={data}", "train.save_steps=2", f"scorer.reference_cache={reference_cache}",
             f"scorer.reference_cache_dir={tmp_path / 'cache'}"] + (["train.lr=1e-3"] if kind == "full" else [])
    # 5 of the 11 pairs' reference log-probs cached: a sharded reference forward is a collective, which the
    # processes must run together even where one of them finds its pairs in the cache
    train(load_config(None, [*_args(tiny_model_dir, data, tmp_path / "warm", 4, kind), *extra,
                             "data.max_train_pairs=5", "train.max_steps=1"]))
    log = _accelerate_launch(FSDP_CONFIG, [*_args(tiny_model_dir, data, tmp_path / "fsdp", 2, kind), *extra])
    assert "engine fsdp: 2 processes" in log
    train(load_config(None, [*_args(tiny_model_dir, data, tmp_path / "single", 4, kind), *extra]))

    assert _losses(tmp_path / "fsdp") == pytest.approx(_losses(tmp_path / "single"), abs=1e-5)
    # checkpoints and final/ hold whole tensors by parameter name, as one process writes them
    for part in ("checkpoints/step-00000002/trainable.safetensors", f"final/{WEIGHTS[kind]}"):
        a, b = load_file(tmp_path / "fsdp" / part), load_file(tmp_path / "single" / part)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    step2 = torch.load(tmp_path / "fsdp/checkpoints/step-00000002/optimizer.pt", weights_only=False)
    assert [v["exp_avg"].shape for v in step2["state"].values()] == [
        v["exp_avg"].shape for v in torch.load(tmp_path / "single/checkpoints/step-00000002/optimizer.pt",
                                               weights_only=False)["state"].values()]

    # the FSDP run's step-2 checkpoint, resumed by one process, finishes as the uninterrupted FSDP run did
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp", resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(list_checkpoints(resumed)[-1])
    train(load_config(None, [*_args(tiny_model_dir, data, resumed, 4, kind), *extra, "resume=auto"]))
    a, b = load_file(resumed / "final" / WEIGHTS[kind]), load_file(tmp_path / "fsdp" / "final" / WEIGHTS[kind])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("override", "match"), [
    ("schedule=ofs", "schedule ofs .* only the offline schedule"),
    ("schedule=apo", "schedule apo .* only the offline schedule"),
    ("optim={name: ondare_adamw, base_model: m}", "optim.name=ondare_adamw .* use adamw"),
    ("diag.enabled=true", "diag.enabled=false under FSDP"),
])
def test_fsdp_refuses_what_needs_whole_weights_before_any_work(override, match):
    config = load_config(None, ["diag.enabled=false", override])
    with pytest.raises(ConfigError, match=match):
        check_engine(config, "fsdp")
    check_engine(config, "ddp")


def test_deepspeed_is_refused_and_fsdp_takes_the_offline_schedule():
    config = load_config(None, ["diag.enabled=false"])
    with pytest.raises(ConfigError, match="DeepSpeed is not supported yet .*configs/accelerate/fsdp.yaml"):
        check_engine(config, "deepspeed")
    for engine in ("single", "ddp", "fsdp"):
        check_engine(config, engine)
