"""Nothing lost: non-finite losses and gradients (stop or skip), no non-finite checkpoint, a failed save, a disk
too small, SIGTERM (finish the step, checkpoint, exit 143) and SIGKILL (resume to the same weights)."""

import json
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


def test_skips_are_counted_in_the_result_the_summary_and_the_report(tiny_model_dir, data, tmp_path, monkeypatch,
                                                                      capsys):
    from preflab.cli import _print_summary
    from preflab.report import write_report

    _poison_calls(monkeypatch, {2, 3})
    result = train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.on_nonfinite=skip", "train.max_steps=4"]))
    assert result.steps == 4 and result.nonfinite_skips == 2
    _print_summary(result)
    assert "trained 4 steps (2 of them skipped: a non-finite loss or gradient, no update)" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("nonfinite_skips") for r in records] == [None, 1, 2, 2]
    page = write_report([tmp_path / "r"], tmp_path / "report.html").read_text()
    assert "<td>4 (2 skipped: non-finite)</td>" in page


def test_skip_gives_up_after_the_limit_naming_what_is_kept(tiny_model_dir, data, tmp_path, monkeypatch):
    _poison_calls(monkeypatch, set(range(1, 100)))
    with pytest.raises(TrainingError, match=r"more than train.max_nonfinite_skips=2 .*no checkpoint was written yet"):
        train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.on_nonfinite=skip", "train.max_steps=5",
                                                                "train.max_nonfinite_skips=2"]))
    monkeypatch.undo()
    _poison_calls(monkeypatch, set(range(3, 100)))  # steps 1, 2 train; 3 is skipped (its checkpoint: step 2's weights)
    with pytest.raises(TrainingError, match=r"the last checkpoint, step-00000003, holds finite weights"):
        train(_cfg(tiny_model_dir, data, tmp_path / "s", extra=["train.on_nonfinite=skip", "train.max_steps=6",
                                                                "train.max_nonfinite_skips=1", "train.save_steps=1"]))


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


@pytest.mark.parametrize("writer,error", [("save_file", "SafetensorError"), ("torch.save", "RuntimeError")])
def test_a_full_disk_seen_by_the_tensor_writers_names_the_intact_checkpoint(tiny_model_dir, data, tmp_path,
                                                                             monkeypatch, writer, error):
    """What safetensors and torch raise on a full disk (neither is an OSError) fails the save like an OSError."""
    from safetensors import SafetensorError

    target = checkpoint_module.torch if writer == "torch.save" else checkpoint_module
    name = writer.split(".")[-1]
    original = getattr(target, name)

    def full_at_step_2(obj, path, *a, **kw):
        if "step-00000002" in str(path):
            if error == "SafetensorError":
                raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return original(obj, path, *a, **kw)

    monkeypatch.setattr(target, name, full_at_step_2)
    with pytest.raises(CheckpointError, match=f"step 2 .* failed \\({error}: .*\\); the previous checkpoint "
                                              "step-00000001 is intact"):
        train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.max_steps=3", "train.save_steps=1"]))
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-00000001"]


def test_an_output_dir_that_cannot_be_written_is_refused_before_any_work(tiny_model_dir, data, tmp_path, monkeypatch):
    import errno

    from preflab.train import safety

    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"output_dir: .*a-file/run cannot be written \(not a directory: "):
        train(_cfg(tiny_model_dir, data, tmp_path / "a-file" / "run", extra=["train.max_steps=1"]))

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(safety.tempfile, "mkstemp", read_only)  # what a read-only mount answers (root bypasses chmod)
    with pytest.raises(ConfigError, match=r"output_dir: .*/ro/run cannot be written \(Read-only file system: "):
        train(_cfg(tiny_model_dir, data, tmp_path / "ro" / "run", extra=["train.max_steps=1"]))
    assert not (tmp_path / "ro").exists()  # nothing was created


def test_a_disk_too_small_for_one_checkpoint_is_refused_before_training(tiny_model_dir, data, tmp_path, monkeypatch):
    from preflab.train import safety

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 4096, 4096))
    with pytest.raises(ConfigError, match=r"GiB free, one checkpoint needs about"):
        train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.max_steps=2"]))
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_ctrl_c_outside_the_steps_ends_in_a_sentence_and_loses_no_step(tiny_model_dir, data, tmp_path, monkeypatch,
                                                                        capsys):
    from preflab.cli import main
    from preflab.train.safety import TrainingInterrupted

    def interrupted(self, policy_is_reference=False):
        if self.state["step"] in stops:
            raise KeyboardInterrupt
        return None

    monkeypatch.setattr(TrainingRun, "evaluate", interrupted)
    stops = {0}  # during the evaluation before training: nothing to save
    assert main(["train", *_args(tiny_model_dir, data, tmp_path / "r", "train.max_steps=3")]) == 130
    err = capsys.readouterr().err
    assert "stopped by SIGINT during the preparation before training at step 0 (no step had finished, nothing to " \
           "save); rerun the same command to resume" in err and "Traceback" not in err
    assert not list_checkpoints(tmp_path / "r")
    stops = {3}  # during the evaluation after training: the trained steps are checkpointed first
    with pytest.raises(TrainingInterrupted, match=r"during the evaluation after training at step 3 \(checkpoint "
                                                  r".*step-00000003\)") as stopped:
        train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.max_steps=3"]))
    assert stopped.value.exit_code == 130 and not (tmp_path / "r" / "final").exists()
    stops = set()
    assert train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.max_steps=3"])).steps == 3  # no step again
    assert (tmp_path / "r" / "final").is_dir()


def test_a_finished_run_with_a_changed_setting_is_refused_and_left_as_it_was(tiny_model_dir, data, tmp_path):
    train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.max_steps=2"]))
    before = (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"holds a finished run \(step-00000002\) trained with other settings "
                                          r"\(train.lr: 0.01 -> 0.005\).*raise train.max_steps to continue it"):
        train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.max_steps=2", "train.lr=5e-3"]))
    assert (tmp_path / "r" / "config.yaml").read_text() == before
    assert not list((tmp_path / "r").glob("config.before-*"))
    assert train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.max_steps=2"])).steps == 2  # unchanged: ok
    # an evaluation setting acts on a finished run: its evaluation after training runs again
    again = train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.max_steps=2", "eval.num_prompts=3"]))
    assert again.steps == 2 and "num_prompts: 3" in (tmp_path / "r" / "config.yaml").read_text()
    assert train(_cfg(tiny_model_dir, data, tmp_path / "r", extra=["train.max_steps=3"])).steps == 3  # continued


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
