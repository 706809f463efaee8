"""DDP on 2 CPU processes (gloo, launched by torchrun) equals one process with the same global batch; so do the
outer schedules (APO, COFS) under FSDP and DeepSpeed ZeRO-3 (launched by accelerate with the shipped configs)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model, sentiment_rows, write_jsonl
from safetensors.torch import load_file

from preflab.config import load_config
from preflab.train import train
from preflab.train.checkpoint import list_checkpoints


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model_dir, data, out, batch_size, kind):
    args = [f"model.name={model_dir}", f"data.train={data}", "data.eval=null", f"output_dir={out}",
            "train.progress=false", "train.warmup_ratio=0", "diag.enabled=false", f"train.batch_size={batch_size}",
            "train.lr=1e-2", "train.max_steps=4", f"parametrization.kind={kind}"]
    if kind == "ofs":  # the fast/slow pair, one routed forward per step; "slow" 3× faster so that roles can swap
        args[-1] = "parametrization.kind=lora"
        args += ["schedule=ofs", "ofs.fused_forward=true", "parametrization.dropout=0", "ofs.swap_interval=2",
                 "ofs.slow_lr_ratio=3"]
    return args


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in _records(run_dir)]


@pytest.mark.parametrize("kind", ["lora", "full", "ofs"])
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tiny_model_dir, tmp_path, kind):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(11))  # 11 pairs: the epoch's last batch is uneven
    _torchrun(_args(tiny_model_dir, data, tmp_path / "ddp", 2, kind), tmp_path)
    train(load_config(None, _args(tiny_model_dir, data, tmp_path / "single", 4, kind)))

    ddp, single = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert len(ddp) == len(single) == 4  # one metrics file (the main process writes alone)
    assert ddp == pytest.approx(single, abs=1e-5)
    if kind == "ofs":  # both modules' losses, and the roles every process decided alike
        for key in ("ofs/loss_fast", "ofs/loss_slow", "ofs/leader"):
            assert [r[key] for r in _records(tmp_path / "ddp")] == pytest.approx(
                [r[key] for r in _records(tmp_path / "single")], abs=1e-5), key
    a = load_file(list_checkpoints(tmp_path / "ddp")[-1] / "trainable.safetensors")
    b = load_file(list_checkpoints(tmp_path / "single")[-1] / "trainable.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # summation order differs (gloo all-reduce): Adam's m/√v amplifies it where the gradient is ~0;
        # the bound is 1% of one update (lr 1e-2)
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("pair", "extra"), [
    ("dora", []), ("ropo", []), ("lora", ["train.grad_accum=2", "parametrization.dropout=0"])])
def test_ofs_with_one_forward_per_module_under_ddp_equals_one_process(tiny_model_dir, tmp_path, pair, extra):
    """A pair of any parametrization runs one forward per module: DDP's reducer expects one forward per backward, so
    the engine averages the gradients itself after the last micro-batch's backward (the others accumulate alone)."""
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(11))
    kinds = {"dora": "parametrization={kind: dora, r: 4}", "lora": "parametrization={kind: lora, r: 4}",
             "ropo": "parametrization={kind: ropo, target_modules: [all-linear], factors: [[2, 1]]}"}

    def args(out, batch_size):
        common = _args(tiny_model_dir, data, out, batch_size, "lora")[:-1]  # (the pair's kind below)
        return [*common, kinds[pair], "schedule=ofs", "ofs.swap_interval=1", "ofs.slow_lr_ratio=3", *extra]

    _torchrun(args(tmp_path / "ddp", 2), tmp_path)
    train(load_config(None, args(tmp_path / "single", 4)))
    ddp, single = _records(tmp_path / "ddp"), _records(tmp_path / "single")
    for key in ("loss", "ofs/loss_fast", "ofs/loss_slow", "ofs/leader", "ofs/grad_norm_fast", "ofs/grad_norm_slow"):
        assert [r[key] for r in ddp] == pytest.approx([r[key] for r in single], rel=1e-4, abs=1e-5), key
    a = load_file(list_checkpoints(tmp_path / "ddp")[-1] / "trainable.safetensors")
    b = load_file(list_checkpoints(tmp_path / "single")[-1] / "trainable.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # (the bound as above)
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_bco_running_shift_under_ddp_equals_one_process(tiny_model_dir, tmp_path):
    """δ is the mean over every process's rewards, weighted by their counts: the epoch's uneven last batch (3 pairs:
    2 on one process, 1 on the other) included."""
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(11))
    extra = ["loss.name=bco_pair"]
    _torchrun([*_args(tiny_model_dir, data, tmp_path / "ddp", 2, "lora"), *extra], tmp_path)
    train(load_config(None, [*_args(tiny_model_dir, data, tmp_path / "single", 4, "lora"), *extra]))
    ddp, single = _records(tmp_path / "ddp"), _records(tmp_path / "single")
    assert [r["delta"] for r in ddp] == pytest.approx([r["delta"] for r in single], abs=1e-6)
    assert [r["loss"] for r in ddp] == pytest.approx([r["loss"] for r in single], abs=1e-5)
    assert len({r["delta"] for r in single}) == 4


@pytest.mark.parametrize("name", ["ondare_adamw", "onties_adamw"])
def test_the_merging_optimizers_under_ddp_equal_one_process(tiny_model_dir, tokenizer, tmp_path, name):
    """Every process draws the same DARE masks (and elects the same TIES signs) as one process: the replicas stay
    equal to each other and to the single-process run."""
    base = tmp_path / "base"
    make_tiny_model(tokenizer, seed=7).save_pretrained(base)  # τ = θ_SFT − θ_base is not 0
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(8))
    extra = [f"optim={{name: {name}, base_model: {base}, reserve_p: 0.3, alpha: 0.01}}"]
    _torchrun([*_args(tiny_model_dir, data, tmp_path / "ddp", 2, "full"), *extra], tmp_path)
    train(load_config(None, [*_args(tiny_model_dir, data, tmp_path / "single", 4, "full"), *extra]))
    a = load_file(list_checkpoints(tmp_path / "ddp")[-1] / "trainable.safetensors")
    b = load_file(list_checkpoints(tmp_path / "single")[-1] / "trainable.safetensors")
    assert a.keys() == b.keys()
    if name == "ondare_adamw":
        assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "single"), abs=1e-5)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    else:  # TIES keeps the top-p of |δ|: Adam's first steps are all near ±lr, so a different summation order of
        # the gradient (gloo's) swaps a few elements at the threshold; the rest agree as under AdamW
        assert _losses(tmp_path / "ddp") == pytest.approx(_losses(tmp_path / "single"), abs=2e-3)
        moved = sum(int(((a[k] - b[k]).abs() > 1e-4).sum()) for k in a)
        assert moved < 0.01 * sum(t.numel() for t in a.values()), moved


def _torchrun(args, tmp_path, target=("-m", "preflab.cli", "train")) -> subprocess.CompletedProcess:
    """2 processes running ``target`` (``preflab train``, or a script) with ``args``; they must succeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *target, *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


ACCELERATE_CONFIGS = Path(__file__).parents[2] / "configs" / "accelerate"
ENGINES = {"fsdp": ("fsdp.yaml", "engine fsdp: 2 processes"),
           "zero2": ("deepspeed_zero2.yaml", "engine deepspeed ZeRO-2: 2 processes"),
           "zero3": ("deepspeed_zero3.yaml", "engine deepspeed ZeRO-3: 2 processes")}


def launch(engine: str, args: list[str], tmp_path=None) -> subprocess.CompletedProcess:
    """``preflab train`` with ``args`` on 2 CPU processes under ``engine``: ``ddp`` (torchrun) or a shipped accelerate
    config (``fsdp``, ``zero2``, ``zero3``); they must succeed, and the log must name the engine."""
    if engine == "ddp":
        return _torchrun(args, tmp_path)
    config, banner = ENGINES[engine]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
           str(ACCELERATE_CONFIGS / config), "--main_process_port", str(_free_port()), "-m", "preflab.cli", "train",
           *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)  # a collective out of step hangs
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert banner in proc.stderr
    return proc


def test_a_resumed_ddp_run_restores_each_process_random_state(tiny_model_dir, tmp_path):
    """LoRA dropout draws per process (each has its own batch shapes); a run stopped after step 2 and resumed must
    continue every process's generator where it stood, not the main process's."""
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(16))
    common = [*_args(tiny_model_dir, data, tmp_path / "unused", 2, "lora"), "parametrization.dropout=0.3",
              "train.lr_scheduler=constant", "train.save_steps=2"]  # constant: a shorter first run, same updates
    _torchrun([*common, f"output_dir={tmp_path / 'whole'}", "train.max_steps=4"], tmp_path)
    _torchrun([*common, f"output_dir={tmp_path / 'resumed'}", "train.max_steps=2"], tmp_path)
    _torchrun([*common, f"output_dir={tmp_path / 'resumed'}", "train.max_steps=4"], tmp_path)  # resumes at 2
    assert _losses(tmp_path / "resumed")[2:] == pytest.approx(_losses(tmp_path / "whole")[2:], abs=1e-6)
    a = load_file(list_checkpoints(tmp_path / "whole")[-1] / "trainable.safetensors")
    b = load_file(list_checkpoints(tmp_path / "resumed")[-1] / "trainable.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero3"])
def test_cofs_under_each_engine_equals_one_process(tiny_model_dir, tmp_path, engine):
    """COFS-DPO on 2 processes: the OFS stages under the engine (ZeRO-3: weights sharded; ZeRO-2 adds nothing the
    DDP and ZeRO-3 cases do not test), the driver's search and evaluations on every process,
    the main process writing — the same weights, scores and held-out losses as one process with the global batch."""
    a = write_jsonl(tmp_path / "a.jsonl", sentiment_rows(12))
    b = write_jsonl(tmp_path / "b.jsonl", [{**r, "chosen": r["rejected"], "rejected": r["chosen"]}
                                           for r in sentiment_rows(12, 100)])

    def args(out, batch_size):
        return [f"model.name={tiny_model_dir}", f"output_dir={out}", "schedule=cofs", "train.progress=false",
                f"data.domains=[{{name: a, train: {a}, eval: {a}}}, {{name: b, train: {b}, eval: {b}}}]",
                "train.warmup_ratio=0", "diag.enabled=false", f"train.batch_size={batch_size}", "train.lr=1e-2",
                "train.max_steps=3", "train.eval_steps=2", "parametrization.kind=lora", "parametrization.r=4",
                "parametrization.dropout=0", "ofs.fused_forward=true", "cofs.buffer_size=6", "cofs.grid_step=0.5"]

    extra = [] if engine in ("ddp", "fsdp") else ["ofs.clip_scope=joint"]
    launch(engine, [*args(tmp_path / "ddp", 2), *extra], tmp_path)
    train(load_config(None, [*args(tmp_path / "single", 4), *extra]))
    ddp, single = (json.loads((tmp_path / r / "matrix.json").read_text()) for r in ("ddp", "single"))
    assert ddp["stages"] == single["stages"] == ["a", "b"]
    assert ddp["scores"] == single["scores"]
    for run in ("ddp", "single"):
        assert len(list((tmp_path / run).glob("stage-2-b/train/metrics.jsonl"))) == 1
    for stage in ("stage-1-a", "stage-2-b"):
        assert _losses(tmp_path / "ddp" / stage / "train") == pytest.approx(
            _losses(tmp_path / "single" / stage / "train"), abs=1e-5)
        de, se = (json.loads((tmp_path / r / stage / "eval.json").read_text()) for r in ("ddp", "single"))
        for domain in ("a", "b"):
            assert de[domain]["preference"]["loss"] == pytest.approx(se[domain]["preference"]["loss"], abs=1e-4)
    dc, sc = (json.loads((tmp_path / r / "stage-2-b" / "combine.json").read_text()) for r in ("ddp", "single"))
    assert dc["weights"] == sc["weights"]


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "zero3"])
def test_apo_under_each_engine_equals_one_process(tiny_model_dir, tmp_path, engine):
    """APO on 2 processes: the main process samples (the same pairs as one process), the DPO iterations train under
    the engine (the KL estimate and extrapolation from the whole copy under sharding), the extrapolated model and
    the records match one process with the global batch."""
    from preflab.models.loader import load_model

    def args(out, batch_size):
        return ["schedule=apo", f"model.name={tiny_model_dir}", f"output_dir={out}", "data.eval=null",
                "eval.task=null", "train.progress=false", "diag.enabled=false", "parametrization.kind=lora",
                "apo.task=concision", "apo.iterations=2", "apo.prompts_per_iteration=8", "apo.k=4",
                "apo.max_new_tokens=12", "apo.batch_prompts=8", "apo.alpha=0.3", f"train.batch_size={batch_size}",
                "train.max_steps=2", "train.lr=1e-2", "train.warmup_ratio=0"]

    launch(engine, args(tmp_path / "ddp", 2), tmp_path)
    train(load_config(None, args(tmp_path / "single", 4)))
    for it in ("iter-1", "iter-2"):
        pairs = [(tmp_path / r / it / "pairs" / "train.jsonl").read_text() for r in ("ddp", "single")]
        assert pairs[0] == pairs[1], it  # sampled by the main process alone, as by one process
        assert _losses(tmp_path / "ddp" / it / "train") == pytest.approx(
            _losses(tmp_path / "single" / it / "train"), abs=1e-5)
    ddp, single = (_records(tmp_path / r) for r in ("ddp", "single"))
    assert [r["apo/pairs_kept"] for r in ddp] == [r["apo/pairs_kept"] for r in single]
    assert [r["apo/kl_to_prev"] for r in ddp] == pytest.approx([r["apo/kl_to_prev"] for r in single], abs=1e-3)
    a, b = (load_model(str(tmp_path / r / "iter-1" / "extrapolated")).state_dict() for r in ("ddp", "single"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


_RANK_WEIGHTS = """
import sys
from preflab.config import load_config
from preflab.train import TrainingRun
run = TrainingRun(load_config(None, sys.argv[1:]))
run.run()
total = sum(float(p.detach().double().sum()) for p in run.param.trainable_parameters().values())
print(f"RANK-WEIGHTS {run.rank} {total!r}", flush=True)
"""


def test_an_update_whose_last_micro_batch_is_passed_over_still_syncs_the_processes(tiny_model_dir, tmp_path):
    """5 pairs in micro-batches of 4 with grad_accum=2: each update's second micro-batch holds 1 pair for 2
    processes and is passed over; the gradients must be synced at the first one (the last that runs), else every
    process steps with its own and the replicas drift apart."""
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(5))
    script = tmp_path / "rank_weights.py"
    script.write_text(_RANK_WEIGHTS)
    proc = _torchrun([*_args(tiny_model_dir, data, tmp_path / "ddp", 2, "lora"), "train.grad_accum=2",
                      "train.max_steps=3"], tmp_path, target=(str(script),))
    assert "passed over" in proc.stderr
    sums = dict(line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("RANK-WEIGHTS"))
    assert sums.keys() == {"0", "1"} and sums["0"] == sums["1"]
