"""An objective's state in a run (BCO's running reward shift δ): updated by training steps only, once a step under
OFS, logged as ``delta``, checkpointed and resumed exactly."""

import json

import pytest
from conftest import sentiment_rows, train_until_killed, write_jsonl

from preflab.config import load_config
from preflab.train import train
from preflab.train.checkpoint import list_checkpoints


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", sentiment_rows(10))


def _config(model_dir, data, out, *extra):
    return load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"output_dir={out}",
                              "train.progress=false", "train.warmup_ratio=0", "diag.enabled=false",
                              "loss.name=bco_pair", "train.batch_size=4", "train.lr=5e-3", "train.max_steps=4",
                              "parametrization.kind=lora", "parametrization.dropout=0", *extra])


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_delta_follows_the_training_rewards_is_only_read_by_evaluation_and_resumes_exactly(tiny_model_dir, data,
                                                                                            tmp_path, monkeypatch):
    """One run evaluates after every step, the other never does and is killed after step 3 and resumed from the
    step-2 checkpoint: both have the same δ at every step (evaluation reads δ, resume restores it)."""
    straight = tmp_path / "straight"
    result = train(_config(tiny_model_dir, data, straight, "train.save_steps=2", f"data.eval={data}",
                           "train.eval_steps=1"))
    records = _records(straight)
    deltas = [r["delta"] for r in records]
    # δ after step k is the mean of the k batches' rewards (4, 4, 2, 4 pairs: 10 pairs, batch 4)
    assert deltas[0] == pytest.approx((records[0]["rewards/chosen"] + records[0]["rewards/rejected"]) / 2, abs=1e-6)
    assert len(set(deltas)) == 4 and deltas[-1] != 0
    state = json.loads((list_checkpoints(straight)[-1] / "state.json").read_text())
    assert state["objective"]["0"]["count"] == 2 * (4 + 4 + 2 + 4)  # every reward of the 4 steps, chosen and rejected
    assert state["objective"]["0"]["mean"] == pytest.approx(deltas[-1], abs=1e-6)
    assert result.before["delta"] == 0.0  # no training step yet
    assert result.after["delta"] == pytest.approx(deltas[-1], abs=1e-6)

    resumed = tmp_path / "resumed"
    train_until_killed(_config(tiny_model_dir, data, resumed, "train.save_steps=2"), 3, monkeypatch)
    train(_config(tiny_model_dir, data, resumed, "train.save_steps=2"))
    assert [r["delta"] for r in _records(resumed)] == deltas
    assert [r["loss"] for r in _records(resumed)] == [r["loss"] for r in records]


def test_ofs_observes_both_modules_once_a_step(tiny_model_dir, data, tmp_path):
    out = tmp_path / "ofs"
    train(_config(tiny_model_dir, data, out, "schedule=ofs", "train.max_steps=2", "train.save_steps=2"))
    state = json.loads((list_checkpoints(out)[-1] / "state.json").read_text())
    assert state["objective"]["0"]["count"] == 2 * 2 * (4 + 4)  # 2 steps × 2 modules × 8 rewards
