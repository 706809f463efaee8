"""What a run prints where stderr is no terminal: one plain line per step of progress, no bar text."""

import logging
import re

import pytest
from conftest import sentiment_rows, write_jsonl

from preflab import console
from preflab.cli import main


def test_lines_log_every_nth_step_and_the_last_with_the_time_left(caplog):
    caplog.set_level(logging.INFO, logger="preflab.progress")
    bar = console.Lines(None, total=5, desc="train", unit="steps", initial=0, every=2)
    for step in range(5):
        bar.set_postfix(loss=f"{0.5 - step / 10:.4f}")
        bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert [re.sub(r" \(.*\)$", "", line) for line in lines] == [
        "train 2/5 steps: loss=0.4000", "train 4/5 steps: loss=0.2000", "train 5/5 steps: loss=0.1000"]
    assert "s left)" in lines[0] and "left" not in lines[-1]


def test_lines_iterate_and_a_resumed_bar_counts_from_its_start(caplog):
    caplog.set_level(logging.INFO, logger="preflab.progress")
    assert list(console.Lines(range(3), None, "build", "batches", 0, None)) == [0, 1, 2]
    resumed = console.Lines(None, 10, "train", "steps", initial=8, every=1)
    resumed.update(1)
    assert caplog.records[-1].getMessage().startswith("train 9/10 steps (")


def test_disabled_progress_prints_nothing(caplog, capsys):
    caplog.set_level(logging.INFO, logger="preflab.progress")
    assert list(console.progress(range(4), desc="x", unit="y", enabled=False)) == [0, 1, 2, 3]
    assert not caplog.records and capsys.readouterr().err == ""


def test_a_run_whose_stderr_is_no_terminal_logs_one_line_per_logging_step(capsys, caplog, tmp_path, tiny_model_dir):
    caplog.set_level(logging.INFO)
    train, held = write_jsonl(tmp_path / "t.jsonl", sentiment_rows(8)), write_jsonl(tmp_path / "e.jsonl",
                                                                                   sentiment_rows(4, 50))
    code = main(["train", f"model.name={tiny_model_dir}", f"data.train={train}", f"data.eval={held}",
                 "train.max_steps=4", "train.batch_size=2", "train.logging_steps=2", "diag.probe_prompts=2",
                 "diag.probe_max_new_tokens=4", "diag.seen_pairs=2", f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 0
    assert "\r" not in err and "it/s" not in err  # no tqdm bar, and no transformers loading/writing bar
    lines = [r.getMessage() for r in caplog.records]
    steps = [line for line in lines if line.startswith("train ")]
    assert [s.split(":")[0] for s in steps] == ["train 2/4 steps", "train 4/4 steps"]
    assert re.match(r"train 2/4 steps: loss=\d\.\d{4} margin=-?\d\.\d{3} acc=\d\.\d\d tok_s=\d+ \(", steps[0])
    # the 3D diagnostics' preparation says what it does before it starts, then how long it took
    plan = next(i for i, line in enumerate(lines) if line.startswith("3D diagnostics: scoring 2 seen pairs"))
    assert "sampling 4 probe responses (2 held-out prompts x 2, up to 4 new tokens)" in lines[plan]
    assert lines[plan + 1].startswith("3D probe: sampling from the reference 1/1 batches")
    assert re.match(r"3D diagnostics: 2 seen pairs, \d+ probe responses, prepared in \d+\.\d s", lines[plan + 2])


@pytest.fixture(autouse=True)
def _restore_library_bars():
    yield
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
