"""FSDP (accelerate's FSDP2 plugin) and DeepSpeed ZeRO-2/3 on 2 CPU processes over gloo, launched with the shipped
accelerate configs: the same losses, weights and generations as one process with the same global batch;
checkpoints that resume (FSDP's under any engine, DeepSpeed's under DeepSpeed); a clear error for what they refuse."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, sentiment_rows, write_jsonl
from safetensors.torch import load_file
from test_distributed import _args, _losses, _records, launch

from preflab.config import ConfigError, load_config
from preflab.train import train
from preflab.train.checkpoint import list_checkpoints
from preflab.train.compat import check_compatible

WEIGHTS = {"lora": "adapter_model.safetensors", "ofs": "adapter_model.safetensors", "full": "model.safetensors"}


def _assert_same_weights(a_file: Path, b_file: Path, atol: float) -> None:
    a, b = load_file(a_file), load_file(b_file)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=atol)


@pytest.mark.parametrize(("engine", "kind", "reference_cache"), [
    ("fsdp", "lora", "lazy"), ("fsdp", "full", "precompute"), ("fsdp", "ofs", "lazy"), ("zero2", "lora", "lazy"),
    ("zero2", "ofs", "lazy"), ("zero3", "ofs", "precompute"),
    ("zero3", "lora", "precompute"), ("zero3", "full", "lazy")])
def test_two_processes_equal_one_process_and_the_checkpoints_resume(tiny_model_dir, tmp_path, engine, kind,
                                                                   reference_cache):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(11))
    extra = [f"data.eval={data}", "train.save_steps=2", f"scorer.reference_cache={reference_cache}",
             f"scorer.reference_cache_dir={tmp_path / 'cache'}"] + (["train.lr=1e-3"] if kind == "full" else [])
    if kind == "ofs":  # roles decided every step: the slow module leads at the end; DeepSpeed clips every gradient
        # together, inside its step
        extra += ["ofs.swap_interval=1"] + (["ofs.clip_scope=joint"] if engine != "fsdp" else [])
    if engine == "zero3":  # the main process generates alone with an unsharded copy while the others wait
        extra += ["eval.task=sentiment", "eval.num_prompts=4", "eval.max_new_tokens=8"]
    if kind == "lora" and engine != "zero2":  # the 3D probe (sampled by the main process, scored by all) and the
        # energy (the main process's whole copy) on held-out prompts
        extra += [f"data.eval={data}", "data.max_eval_pairs=3", "diag.enabled=true", "diag.seen_pairs=3",
                  "diag.probe_prompts=2", "diag.probe_samples=1", "diag.probe_max_new_tokens=4", "diag.probe_every=2"]
    # 5 of the 11 pairs' reference log-probs cached: a sharded reference forward is a collective, which the
    # processes must run together even where one of them finds its pairs in the cache
    train(load_config(None, [*_args(tiny_model_dir, data, tmp_path / "warm", 4, kind), *extra,
                             "data.max_train_pairs=5", "train.max_steps=1", "eval.task=null"]))
    launch(engine, [*_args(tiny_model_dir, data, tmp_path / "multi", 2, kind), *extra])
    train(load_config(None, [*_args(tiny_model_dir, data, tmp_path / "single", 4, kind), *extra]))

    multi, single = tmp_path / "multi", tmp_path / "single"
    assert _losses(multi) == pytest.approx(_losses(single), abs=1e-5)
    if kind == "ofs":  # both modules' losses and the roles; the slow module leads at the end: final/ is the leader
        for key in ("ofs/loss_fast", "ofs/loss_slow", "ofs/leader"):
            assert [r[key] for r in _records(multi)] == pytest.approx([r[key] for r in _records(single)], abs=1e-5)
        assert _records(multi)[-1]["ofs/leader"] == 1
    if "diag.enabled=true" in extra:
        measured = lambda k: k.startswith(("3d/", "he/")) and k != "3d/probe_seconds"  # noqa: E731
        diagnostics = [{k: v for k, v in r.items() if measured(k)} for r in _records(single)]
        assert "3d/probe_logratio" in diagnostics[1] and "he/drift_mean" in diagnostics[1]
        for got, want in zip(_records(multi), diagnostics, strict=True):
            assert {k: got[k] for k in want} == pytest.approx(want, abs=1e-5)
        assert (multi / "probe.jsonl").read_text() == (single / "probe.jsonl").read_text()
    # checkpoints and final/ hold whole tensors by parameter name, as one process writes them
    for part in ("checkpoints/step-00000002/trainable.safetensors", f"final/{WEIGHTS[kind]}"):
        _assert_same_weights(multi / part, single / part, atol=1e-4)
    if engine == "zero3":
        gens = [json.loads((r / "eval.json").read_text())["generation"]["sentiment"] for r in (multi, single)]
        assert gens[0]["gold/kl"] == pytest.approx(gens[1]["gold/kl"], abs=1e-4)
        assert gens[0]["gold/reward"] == gens[1]["gold/reward"]

    # the step-2 checkpoint resumed finishes as the uninterrupted run did: FSDP's (whole tensors) by one process,
    # DeepSpeed's (its partitioned optimizer state) under DeepSpeed with as many processes
    resumed = tmp_path / "resumed"
    shutil.copytree(multi, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(list_checkpoints(resumed)[-1])
    again = [*extra, "resume=auto", "eval.task=null"]
    if engine == "fsdp":
        train(load_config(None, [*_args(tiny_model_dir, data, resumed, 4, kind), *again]))
    else:
        with pytest.raises(ConfigError, match="written under DeepSpeed .* resume it under DeepSpeed with 2 processes"):
            train(load_config(None, [*_args(tiny_model_dir, data, resumed, 4, kind), *again]))
        launch(engine, [*_args(tiny_model_dir, data, resumed, 2, kind), *again])
    _assert_same_weights(resumed / "final" / WEIGHTS[kind], multi / "final" / WEIGHTS[kind], atol=1e-6)


@pytest.mark.parametrize(("name", "options"), [("ondare_adamw", "online_step: 2"), ("onties_adamw", "seed: 3")])
def test_the_merging_optimizers_under_fsdp_equal_one_process_and_resume(tiny_model_dir, tokenizer, tmp_path, name,
                                                                         options):
    """Each sharded tensor is merged whole (τ̃ and δ gathered): the same DARE masks and TIES top-k as one process;
    the task vectors, built before the model is sharded, move to the shards; OnDARE merges every 2nd step (the
    remembered steps are shards too); an FSDP checkpoint (whole τ̃ and generator) resumes under one process."""
    base = tmp_path / "base"
    make_tiny_model(tokenizer, seed=7).save_pretrained(base)  # τ = θ_SFT − θ_base is not 0
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(8))
    extra = [f"optim={{name: {name}, base_model: {base}, reserve_p: 0.3, alpha: 0.01, {options}}}",
             "train.save_steps=2"]
    launch("fsdp", [*_args(tiny_model_dir, data, tmp_path / "multi", 2, "full"), *extra])
    train(load_config(None, [*_args(tiny_model_dir, data, tmp_path / "single", 4, "full"), *extra]))
    multi, single = tmp_path / "multi", tmp_path / "single"
    if name == "ondare_adamw":
        assert _losses(multi) == pytest.approx(_losses(single), abs=1e-5)
    else:
        assert _losses(multi) == pytest.approx(_losses(single), abs=2e-3)
    _assert_merged_alike(multi / "final" / WEIGHTS["full"], single / "final" / WEIGHTS["full"], name, atol=1e-4)

    resumed = tmp_path / "resumed"
    shutil.copytree(multi, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(list_checkpoints(resumed)[-1])
    train(load_config(None, [*_args(tiny_model_dir, data, resumed, 4, "full"), *extra, "resume=auto"]))
    _assert_merged_alike(resumed / "final" / WEIGHTS["full"], multi / "final" / WEIGHTS["full"], name, atol=1e-5)


def _assert_merged_alike(a_file: Path, b_file: Path, name: str, atol: float) -> None:
    """OnDARE: the same weights. OnTIES keeps the top-p of |δ| and Adam's first steps are all near ±lr: a different
    summation order of the gradient (gloo's reduce-scatter) swaps a few elements at the threshold; the rest agree."""
    if name == "ondare_adamw":
        _assert_same_weights(a_file, b_file, atol)
        return
    a, b = load_file(a_file), load_file(b_file)
    assert a.keys() == b.keys()
    moved = sum(int(((a[k] - b[k]).abs() > atol).sum()) for k in a)
    assert moved < 0.01 * sum(t.numel() for t in a.values()), moved


@pytest.mark.parametrize(("override", "match"), [
    ("optim={name: ondare_adamw, base_model: m}", "optim.name=ondare_adamw .* use adamw, or launch with .*fsdp"),
])
def test_deepspeed_refuses_the_merging_optimizers_before_any_work(override, match):
    config = load_config(None, ["diag.enabled=false", override, "parametrization.kind=full"])  # (the paper's setting)
    with pytest.raises(ConfigError, match=match):
        check_compatible(config, "deepspeed")
    for engine in ("single", "ddp", "fsdp"):
        check_compatible(config, engine)


@pytest.mark.parametrize(("overrides", "match"), [
    (["train.on_nonfinite=skip"], "DeepSpeed: train.on_nonfinite=skip .* use train.on_nonfinite=stop"),
    (["schedule=ofs", "ofs.fused_forward=true"], "DeepSpeed: ofs.clip_scope=per_module .* use ofs.clip_scope=joint"),
    (["schedule=apo", "apo.inner=ofs", "ofs.fused_forward=true"], "ofs.clip_scope=per_module .* ofs.clip_scope=joint")])
def test_deepspeed_refuses_what_its_own_step_does_instead(overrides, match):
    """DeepSpeed applies the update (and clips every gradient together) inside its backward."""
    config = load_config(None, ["diag.enabled=false", *overrides])
    with pytest.raises(ConfigError, match=match):
        check_compatible(config, "deepspeed")
    for engine in ("single", "ddp", "fsdp"):
        check_compatible(config, engine)
