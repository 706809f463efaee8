"""A damaged checkpoint loses nothing: a file of the newest checkpoint truncated, deleted or corrupted is named, and
``resume: auto`` continues from the newest intact one, to the same weights as a run never stopped; with no intact
checkpoint, or a damaged one named by ``resume: PATH``, the run stops with an error naming the file."""

import logging
import shutil

import pytest
import torch
from conftest import sentiment_rows, train_until_killed, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from preflab.config import load_config
from preflab.train import checkpoint, train
from preflab.train.checkpoint import CHECKSUMS_FILE, CheckpointUnreadable, list_checkpoints

EXTRA = ("train.max_steps=4", "train.save_steps=1", "train.save_total_limit=null")


def _cfg(model_dir, data, out, *extra):
    return load_config(None, [f"model.name={model_dir}", f"data.train={data}", "data.eval=null", f"output_dir={out}",
                              "train.progress=false", "train.warmup_ratio=0", "diag.enabled=false",
                              "train.batch_size=4", "train.lr=1e-2", *EXTRA, *extra])


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """A run killed after step 3 (checkpoints 1..3) and the final checkpoint of the same run never stopped."""
    root = tmp_path_factory.mktemp("runs")
    data = write_jsonl(root / "pairs.jsonl", sentiment_rows(16))
    with pytest.MonkeyPatch.context() as monkeypatch:
        train_until_killed(_cfg(tiny_model_dir, data, root / "killed"), 3, monkeypatch)
    train(_cfg(tiny_model_dir, data, root / "straight"))
    return {"model": tiny_model_dir, "data": data, "killed": root / "killed",
            "final": load_file(list_checkpoints(root / "straight")[-1] / "trainable.safetensors")}


def _copy(runs, out):
    shutil.copytree(runs["killed"], out)
    return list_checkpoints(out)


def _resume_to_the_end(runs, out) -> None:
    result = train(_cfg(runs["model"], runs["data"], out))
    last = list_checkpoints(out)[-1]
    assert result.steps == 4 and last.name == "step-00000004"
    trained = load_file(last / "trainable.safetensors")
    assert trained.keys() == runs["final"].keys() and all(torch.equal(trained[k], runs["final"][k]) for k in trained)


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == checkpoint.__name__)


def _damage(path, action, where: float, junk: bytes) -> None:
    if action == "delete":
        path.unlink()
        return
    data = path.read_bytes()
    at = int(where * len(data))
    if action == "truncate":
        path.write_bytes(data[:at])
    else:  # overwrite some bytes in place
        path.write_bytes(data[:at] + junk + data[at + len(junk):])


FILES = ["trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json", CHECKSUMS_FILE]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=st.sampled_from(FILES), action=st.sampled_from(["truncate", "delete", "corrupt"]),
       where=st.floats(0, 1, exclude_max=True), junk=st.binary(min_size=1, max_size=16))
def test_any_file_of_the_newest_checkpoint_damaged_resumes_from_an_intact_one(runs, tmp_path_factory, caplog, name,
                                                                              action, where, junk):
    out = tmp_path_factory.mktemp("fuzz") / "run"
    newest = _copy(runs, out)[-1]
    before = (newest / name).read_bytes()
    _damage(newest / name, action, where, junk)
    changed = not (newest / name).exists() or (newest / name).read_bytes() != before
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="preflab.train.checkpoint"):
        _resume_to_the_end(runs, out)
    told = _warnings(caplog)
    skipped = "step-00000003" in told
    if name != CHECKSUMS_FILE:
        assert skipped == changed
    elif action == "delete":
        assert not skipped  # the files are checked by reading each instead
    if skipped:
        assert "continuing from step-00000002" in told
        if name != CHECKSUMS_FILE:  # (a damaged list of checksums may name a file it no longer matches)
            assert (f"has no {name}" if name == "state.json" and action == "delete" else f"{name} is") in told


def test_a_checkpoint_without_checksums_is_checked_by_reading_every_file(runs, tmp_path, caplog):
    """Checkpoints written before checksums.json: a truncated file still fails to load and is named."""
    newest = _copy(runs, tmp_path / "run")[-1]
    (newest / CHECKSUMS_FILE).unlink()
    checkpoint.verify_checkpoint(newest)  # intact: every file reads
    _damage(newest / "optimizer.pt", "truncate", 0.5, b"")
    with pytest.raises(CheckpointUnreadable, match=r"step-00000003: optimizer.pt is unreadable \("):
        checkpoint.load_checkpoint(newest)
    with caplog.at_level(logging.WARNING, logger="preflab.train.checkpoint"):
        _resume_to_the_end(runs, tmp_path / "run")
    assert "step-00000003: optimizer.pt is unreadable" in _warnings(caplog)


def test_without_an_intact_checkpoint_or_with_a_damaged_one_named_the_run_stops_naming_the_files(runs, tmp_path):
    checkpoints = _copy(runs, tmp_path / "run")
    (checkpoints[-1] / "rng.pt").write_bytes(b"")
    with pytest.raises(CheckpointUnreadable, match=r"step-00000003: rng.pt is truncated or corrupt"):
        train(_cfg(runs["model"], runs["data"], tmp_path / "run", f"resume={checkpoints[-1]}"))
    for path in checkpoints[:-1]:
        (path / "optimizer.pt").unlink()
    with pytest.raises(CheckpointUnreadable, match=r"no intact checkpoint .*step-00000003: rng.pt .*"
                                                   r"step-00000001: optimizer.pt is missing .*move checkpoints/ away"):
        train(_cfg(runs["model"], runs["data"], tmp_path / "run"))
    assert (checkpoints[0] / "trainable.safetensors").is_file()  # nothing was removed
