"""The offline loop end to end on a tiny model: it learns, it resumes exactly, its outputs load without preflab."""

import json
import math

import pytest
import torch
from conftest import sentiment_rows, train_until_killed, write_jsonl
from safetensors.torch import load_file

from preflab.config import ConfigError, load_config
from preflab.train import TrainingError, train


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", sentiment_rows(16))


def _config(model_dir, data, out, *extra):
    return load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"data.eval={data}",
                              f"output_dir={out}", "train.progress=false", "train.warmup_ratio=0", *extra])


def test_sixteen_pairs_are_learned(tiny_model_dir, data16, tmp_path):
    """Held-out-on-train preference accuracy reaches 1.0 and the loss falls well below ln 2."""
    result = train(_config(tiny_model_dir, data16, tmp_path / "run", "parametrization.kind=full",
                           "train.max_steps=20", "train.lr=3e-3"))
    assert result.before["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result.before["rewards/accuracies"] == 0.0
    assert result.after["rewards/accuracies"] == 1.0
    assert result.after["loss"] < 0.3
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected", "lr", "grad_norm", "tokens_per_second"):
        assert key in records[0], key
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["after"]["rewards/accuracies"] == 1.0

    # the same command again finds the finished run: no step is redone, nothing is recorded twice
    again = train(_config(tiny_model_dir, data16, tmp_path / "run", "parametrization.kind=full",
                          "train.max_steps=20", "train.lr=3e-3"))
    assert again.steps == 20 and again.after == result.after
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 20
    history = json.loads((tmp_path / "run" / "eval.json").read_text())["history"]
    assert [h["step"] for h in history] == [20]


def _final_trainable(run_dir):
    return load_file(sorted((run_dir / "checkpoints").iterdir())[-1] / "trainable.safetensors")


@pytest.mark.parametrize("kind", ["lora", "full", "ropo"])
def test_interrupted_run_resumes_to_identical_weights(tiny_model_dir, data16, tmp_path, monkeypatch, kind):
    extra = [f"parametrization.kind={kind}", "train.max_steps=6", "train.save_steps=2", "train.batch_size=3",
             "train.grad_accum=2", "train.lr=1e-3", "train.lr_scheduler=cosine", "train.warmup_ratio=0.2"]
    if kind == "lora":
        extra += ["parametrization.dropout=0.2", "parametrization.r=4"]
    train(_config(tiny_model_dir, data16, tmp_path / "straight", *extra))

    train_until_killed(_config(tiny_model_dir, data16, tmp_path / "resumed", *extra), 4, monkeypatch)
    assert not (tmp_path / "resumed" / "final").exists()
    result = train(_config(tiny_model_dir, data16, tmp_path / "resumed", *extra))  # resume=auto
    assert result.steps == 6
    a, b = _final_trainable(tmp_path / "straight"), _final_trainable(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # no duplicated records after the resume


def test_resume_never_refuses_a_directory_with_checkpoints(tiny_model_dir, data16, tmp_path):
    train(_config(tiny_model_dir, data16, tmp_path / "r", "train.max_steps=1"))
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(_config(tiny_model_dir, data16, tmp_path / "r", "train.max_steps=1", "resume=never"))


def test_resume_with_a_changed_config_keeps_the_old_one_and_names_the_change(tiny_model_dir, data16, tmp_path,
                                                                             caplog):
    train(_config(tiny_model_dir, data16, tmp_path / "before-the-move", "train.max_steps=1"))
    (tmp_path / "before-the-move").rename(tmp_path / "r")  # a moved run directory is the same run
    with caplog.at_level("WARNING", logger="preflab.train.loop"):
        train(_config(tiny_model_dir, data16, tmp_path / "r", "train.max_steps=2"))
    assert "train.max_steps: 1 -> 2" in caplog.text and "output_dir" not in caplog.text
    kept = list((tmp_path / "r").glob("config.before-*.yaml"))
    assert len(kept) == 1 and "max_steps: 1" in kept[0].read_text()
    assert "max_steps: 2" in (tmp_path / "r" / "config.yaml").read_text()


def test_non_finite_loss_stops_naming_the_step_and_rows(tiny_model_dir, data16, tmp_path, monkeypatch):
    from preflab.losses import base

    original = base.Objective.__call__

    def poisoned(self, logps):
        out = original(self, logps)
        return base.LossOutput(out.losses * float("nan"), out.chosen_rewards, out.rejected_rewards, out.margin)

    monkeypatch.setattr(base.Objective, "__call__", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step 1.*pairs.jsonl row"):
        train(_config(tiny_model_dir, data16, tmp_path / "nan", "train.max_steps=2", "data.eval=null"))
    assert not (tmp_path / "nan" / "checkpoints").exists()
