"""The generation evaluator: a policy equal to the reference wins half and has zero KL; the statistics."""

from contextlib import contextmanager

import numpy as np
import pytest
from conftest import make_tiny_model

from preflab.config import GenerationEvalConfig
from preflab.eval.generation import GenerationEvaluator, bootstrap_interval, distinct_n, win_rate


def test_policy_equal_to_reference(tokenizer):
    model = make_tiny_model(tokenizer, seed=4)

    @contextmanager
    def same():
        yield model

    cfg = GenerationEvalConfig(task="sentiment", num_prompts=6, max_new_tokens=8, batch_size=4, bootstrap=50)
    result = GenerationEvaluator(tokenizer, cfg).evaluate(model, same)
    assert result["gold/win_rate"] == 0.5
    assert result["gold/kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["gold/reward"] == result["gold/reward_ref"]
    assert result["gold/reward_ci_low"] <= result["gold/reward"] <= result["gold/reward_ci_high"]
    assert result["gen/length_tokens"] > 0 and len(result["examples"]) == 5


def test_different_policy_has_positive_kl(tokenizer):
    policy, reference = make_tiny_model(tokenizer, seed=4), make_tiny_model(tokenizer, seed=5)

    @contextmanager
    def ref():
        yield reference

    cfg = GenerationEvalConfig(task="sentiment", num_prompts=8, max_new_tokens=8, batch_size=8, bootstrap=50)
    result = GenerationEvaluator(tokenizer, cfg).evaluate(policy, ref)
    assert result["gold/kl"] > 0


def test_statistics():
    assert win_rate(np.array([1.0, 0.0, 0.5]), np.array([0.0, 0.0, 1.0])) == pytest.approx((1 + 0.5 + 0) / 3)
    assert distinct_n(["a b a b", "a b"], 1) == pytest.approx(2 / 6)
    assert distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)
    assert distinct_n(["", " "], 2) == 0.0
    values = np.random.default_rng(0).normal(size=400)
    low, high = bootstrap_interval(values, 500, seed=0)
    assert low < values.mean() < high and high - low < 0.3
    assert bootstrap_interval(np.ones(10), 100, seed=0) == (1.0, 1.0)
