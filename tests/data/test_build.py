"""The pair builder: well-formed pairs, chosen scored above rejected, resumable without changing the result."""

import json

import pytest
from conftest import make_tiny_model

from preflab.data.build import BuildConfig, build_pairs, write_data_card
from preflab.models.generate import SamplingConfig
from preflab.rewards import register_reward
from preflab.tasks import Task, register_task


@register_reward("test_length")
class LengthReward:
    """Number of characters of the response (a stand-in gold reward with spread on random models)."""

    name = "test_length"

    def __call__(self, prompts, responses):
        return [float(len(r)) for r in responses]


register_task(Task("test_task", lambda split, seed: [f"{split} prompt {i}" for i in range(7)], "test_length"))


@pytest.fixture(scope="module")
def tiny(tokenizer):
    return make_tiny_model(tokenizer, seed=3)


def _cfg(**kw):
    settings = dict(task="test_task", k=3, min_gap=1.0, batch_prompts=2, seed=5,
                    sampling=SamplingConfig(max_new_tokens=6))
    return BuildConfig(**{**settings, **kw})


def test_pairs_are_well_formed_and_ranked(tmp_path, tiny, tokenizer):
    stats = build_pairs(_cfg(), tmp_path, model=tiny, tokenizer=tokenizer, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    assert stats["prompts"] == 7 and stats["samples"] == 21 and stats["pairs"] == len(rows) > 0
    for row in rows:
        assert row["score_chosen"] - row["score_rejected"] >= 1.0
        assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        assert row["chosen"] != row["rejected"] and row["domain"] == "test_task"
    card = write_data_card(tmp_path, "test_task", splits=("train",)).read_text()
    assert "pairs" in card and "preflab data build test_task" in card


def test_interrupted_build_resumes_to_the_same_result(tmp_path, tiny, tokenizer):
    build_pairs(_cfg(), tmp_path / "a", model=tiny, tokenizer=tokenizer, progress=False)
    build_pairs(_cfg(num_prompts=4), tmp_path / "b", model=tiny, tokenizer=tokenizer, progress=False)
    samples = tmp_path / "b" / "train.samples.jsonl"
    samples.write_text(samples.read_text() + '{"batch": 2, "items": [{"torn')  # crash in the middle of a write
    build_pairs(_cfg(), tmp_path / "b", model=tiny, tokenizer=tokenizer, progress=False)
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()
    batches = [json.loads(line)["batch"] for line in samples.read_text().splitlines()]
    assert batches == [0, 1, 2, 3]  # the torn fragment was cut, nothing done twice


def test_resuming_with_other_prompts_is_refused(tmp_path, tiny, tokenizer):
    from preflab.data.dataset import DataError

    build_pairs(_cfg(num_prompts=4), tmp_path, model=tiny, tokenizer=tokenizer, progress=False)
    with pytest.raises(DataError, match="built with other prompts"):
        build_pairs(_cfg(batch_prompts=3), tmp_path, model=tiny, tokenizer=tokenizer, progress=False)


def test_ties_never_make_a_pair():
    from preflab.data.build import _pair_rows

    items = [{"index": 0, "prompt": "p", "responses": ["a", "b"], "scores": [0.5, 0.5]}]
    assert _pair_rows(BuildConfig(task="t", min_gap=0.0), items) == []
