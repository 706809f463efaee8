"""Two steps of every objective and every parametrization option on a tiny model: runs, finite, weights move."""

import pytest
import torch
from conftest import sentiment_rows, write_jsonl
from safetensors.torch import load_file

from preflab.config import load_config
from preflab.losses import loss_registry
from preflab.train import TrainingRun


@pytest.fixture(scope="module")
def data8(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("smoke") / "d.jsonl", sentiment_rows(8))


def _two_steps(model_dir, data, out, *extra):
    cfg = load_config(None, [f"model.name={model_dir}", f"data.train={data}", "data.eval=null",
                             f"output_dir={out}", "train.progress=false", "train.max_steps=2", "train.batch_size=4",
                             "train.lr=1e-2", "train.warmup_ratio=0", *extra])
    run = TrainingRun(cfg)
    before = {k: v.clone() for k, v in run.param.trainable_state_dict().items()}
    result = run.run()
    after = load_file(out / "checkpoints" / "step-00000002" / "trainable.safetensors")
    moved = sum(not torch.equal(before[k], after[k]) for k in before)
    records = (out / "metrics.jsonl").read_text().splitlines()
    return result, moved, len(before), records


@pytest.mark.parametrize("name", sorted(loss_registry()))
def test_every_objective_trains(tiny_model_dir, data8, tmp_path, name):
    _, moved, total, records = _two_steps(tiny_model_dir, data8, tmp_path / name, f"loss.name={name}",
                                          "parametrization.r=4")
    assert len(records) == 2 and "NaN" not in "".join(records)
    assert moved == total  # every LoRA tensor received an update by step 2


@pytest.mark.parametrize("extra", [
    ("parametrization.kind=dora",),
    ("train.precision=bf16",),
    ("train.gradient_checkpointing=true",),
    ("parametrization.target_modules=[q_proj,v_proj]",),
    ("scorer.chunk_size=0",),
], ids=lambda e: e[0])
def test_parametrization_and_precision_options(tiny_model_dir, data8, tmp_path, extra):
    _, moved, total, records = _two_steps(tiny_model_dir, data8, tmp_path / "run", "parametrization.r=4", *extra)
    assert moved > 0 and len(records) == 2 and "NaN" not in "".join(records)


def test_lora_targets_only_the_named_modules(tiny_model_dir, data8, tmp_path):
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"data.train={data8}", "data.eval=null",
                             f"output_dir={tmp_path}", "parametrization.target_modules=[q_proj]"])
    names = TrainingRun(cfg).param.trainable_state_dict()
    assert names and all("q_proj" in n for n in names)


def test_tensorboard_tracker_writes_events(tiny_model_dir, data8, tmp_path):
    pytest.importorskip("tensorboard")
    _two_steps(tiny_model_dir, data8, tmp_path / "tb", "train.report_to=[tensorboard]", "parametrization.r=4")
    assert list((tmp_path / "tb").rglob("events.out.tfevents*"))
