"""Nothing lost: non-finite losses and gradients (stop or skip), no non-finite checkpoint, a failed save, a disk
too small, SIGTERM (finish the step, checkpoint, exit 143) and SIGKILL (resume to the same weights)."""

import os
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest
import torch
from conftest import sentiment_rows, write_jsonl
from safetensors.torch import load_file

from preflab.config import ConfigError, load_config
from preflab.train import TrainingError, TrainingRun, train
from preflab.train import checkpoint as checkpoint_module
from preflab.train.checkpoint import CheckpointError, list_checkpoints


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", sentiment_rows(16))


def _args(model_dir, data, out, *extra):
    return [f"model.name={model_dir}", f"data.train={data}", "data.eval=null", f"output_dir={out}",
            "train.progress=false", "train.warmup_ratio=0", "diag.enabled=false", "train.batch_size=4",
            "train.lr=1e-2", *extra]


def _cfg(*args, **kw):
    return load_config(None, _args(*args, *kw.pop("extra", ())))


def _trainable(ckpt) -> dict:
    return load_file(ckpt / "trainable.safetensors")


def _poison_calls(monkeypatch, calls):
    """The objective returns NaN losses on the given (1-based) calls."""
    from preflab.losses import base

    original, count = base.Objective.__call__, [0]

    def poisoned(self, logps):
        count[0] += 1
        out = original(self, logps)
        if count[0] in calls:
            return base.LossOutput(out.losses * float("nan"), out.chosen_rewards, out.rejected_rewards, out.margin)
        return out

    monkeypatch.setattr(base.Objective, "__call__", poisoned)


def test_skip_leaves_the_weights_of_a_non_finite_step_untouched(tiny_model_dir, data, tmp_path, monkeypatch, caplog):
    _poison_calls(monkeypatch, {2})
    with caplog.at_level("WARNING", logger="preflab.train.loop"):
        train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.on_nonfinite=skip", "train.max_steps=3",
                                                                "train.save_steps=1", "train.save_total_limit=null"]))
    assert "non-finite loss (nan) at step 2" in caplog.text and "update skipped (1 so far)" in caplog.text
    step1, step2, step3 = list_checkpoints(tmp_path / "r")
    a, b, c = _trainable(step1), _trainable(step2), _trainable(step3)
    assert all(torch.equal(a[k], b[k]) for k in a)  # the skipped update changed nothing
    assert not all(torch.equal(b[k], c[k]) for k in b)  # and training went on
    records = [line for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert '"nonfinite_skipped": 1' in records[1] and "nonfinite_skipped" not in records[2]


def test_skip_gives_up_after_the_limit(tiny_model_dir, data, tmp_path, monkeypatch):
    _poison_calls(monkeypatch, set(range(1, 100)))
    with pytest.raises(TrainingError, match="more than train.max_nonfinite_skips=2"):
        train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.on_nonfinite=skip", "train.max_steps=5",
                                                                "train.max_nonfinite_skips=2"]))


def test_non_finite_gradient_stops_before_the_update(tiny_model_dir, data, tmp_path, monkeypatch):
    original = TrainingRun.micro_step

    def nan_grad(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.state["step"] == 1:
            next(p for p in self.param.model.parameters() if p.requires_grad).grad.fill_(float("inf"))
        return out

    monkeypatch.setattr(TrainingRun, "micro_step", nan_grad)
    with pytest.raises(TrainingError, match=r"non-finite gradient \(norm inf\) at step 2, batch of 4 pairs"):
        train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.max_steps=3", "train.save_steps=1"]))
    (only,) = list_checkpoints(tmp_path / "r")
    assert only.name == "step-00000001" and all(torch.isfinite(t).all() for t in _trainable(only).values())


def test_a_non_finite_weight_is_never_checkpointed(tiny_model_dir, data, tmp_path):
    run = TrainingRun(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.max_steps=1"]))
    next(p for p in run.param.model.parameters() if p.requires_grad).data[0] = float("nan")
    with pytest.raises(TrainingError, match="refusing to write the checkpoint of step 0: non-finite values"):
        run.save()
    assert not list_checkpoints(tmp_path / "r")


def test_a_failed_save_keeps_the_previous_checkpoint(tiny_model_dir, data, tmp_path, monkeypatch):
    original, saves = checkpoint_module.torch.save, []

    def disk_full_at_step_2(obj, path, *a, **kw):
        saves.append(path)
        if "step-00000002" in str(path) and str(path).endswith("optimizer.pt"):
            raise OSError(28, "No space left on device")
        return original(obj, path, *a, **kw)

    monkeypatch.setattr(checkpoint_module.torch, "save", disk_full_at_step_2)
    with pytest.raises(CheckpointError, match="step 2 .* failed .*No space left.* step-00000001 is intact"):
        train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.max_steps=3", "train.save_steps=1"]))
    root = tmp_path / "r" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-00000001"]  # no half-written directory left behind
    monkeypatch.setattr(checkpoint_module.torch, "save", original)
    (root / ".step-00000002.tmp-killed").mkdir()  # what a SIGKILL during a save leaves: ignored, then removed
    (root / ".step-00000002.tmp-killed" / "trainable.safetensors").write_bytes(b"torn")
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step-00000001"]
    result = train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.max_steps=3", "train.save_steps=1"]))
    assert result.steps == 3 and not list(root.glob(".step-*"))


def test_a_disk_too_small_for_one_checkpoint_is_refused_before_training(tiny_model_dir, data, tmp_path, monkeypatch):
    from preflab.train import safety

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 4096, 4096))
    with pytest.raises(ConfigError, match=r"GiB free, one checkpoint needs about"):
        train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.max_steps=2"]))
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


# -- real signals, in a child process --------------------------------------------------------------------------


def _launch(args) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "preflab.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(proc: subprocess.Popen, metrics, steps: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the child did not reach the step in time")


def test_sigterm_finishes_the_step_checkpoints_and_exits(tiny_model_dir, data, tmp_path):
    out = tmp_path / "r"
    proc = _launch(_args(tiny_model_dir, data, out, "train.max_steps=100000"))
    _wait_for_steps(proc, out / "metrics.jsonl", 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    (ckpt,) = list_checkpoints(out)
    step = int(ckpt.name.split("-")[1])
    assert f"stopped by SIGTERM after step {step}" in err and "rerun the same command to resume" in err
    assert len((out / "metrics.jsonl").read_text().splitlines()) == step  # the step in progress was finished


def test_sigkill_at_any_step_resumes_to_the_same_weights(tiny_model_dir, data, tmp_path):
    extra = ("train.max_steps=24", "train.save_steps=1", "train.save_total_limit=2")
    proc = _launch(_args(tiny_model_dir, data, tmp_path / "killed", *extra))
    _wait_for_steps(proc, tmp_path / "killed" / "metrics.jsonl", 5)
    proc.kill()
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL
    killed_at = len(list_checkpoints(tmp_path / "killed"))
    assert killed_at and int(list_checkpoints(tmp_path / "killed")[-1].name.split("-")[1]) < 24
    resumed = train(_cfg(tiny_model_dir, data, tmp_path / "killed", extra=extra))
    straight = train(_cfg(tiny_model_dir, data, tmp_path / "straight", extra=extra))
    assert resumed.steps == straight.steps == 24
    a = _trainable(list_checkpoints(tmp_path / "killed")[-1])
    b = _trainable(list_checkpoints(tmp_path / "straight")[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
