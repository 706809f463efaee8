"""Held-out scoring: batching and length-sorting never change a pair's result; metrics at the reference."""

import pytest
import torch
from conftest import make_tiny_model, sentiment_rows
from torch.testing import assert_close

from preflab.data.formats import normalize_row
from preflab.data.tokenize import PairTokenizer
from preflab.eval.preference import preference_metrics, score_pairs
from preflab.eval.scoring import score_sequences
from preflab.losses import build_objective
from preflab.models.scorer import SequenceScorer


def test_batched_scores_equal_one_pair_at_a_time(tokenizer):
    rows = sentiment_rows(7)
    rows[2]["chosen"][0]["content"] = "long " * 40
    pt = PairTokenizer(tokenizer)
    pairs = [pt(normalize_row(r, str(i))) for i, r in enumerate(rows)]
    scorer = SequenceScorer(make_tiny_model(tokenizer))
    single = score_pairs(scorer, pairs, 1, tokenizer.pad_token_id)
    batched = score_pairs(scorer, pairs, 3, tokenizer.pad_token_id)
    for a, b in zip(vars(single).values(), vars(batched).values()):
        assert_close(b, a, atol=1e-5, rtol=0)


def test_metrics_of_a_policy_equal_to_its_reference(tokenizer):
    pt = PairTokenizer(tokenizer)
    pairs = [pt(normalize_row(r, str(i))) for i, r in enumerate(sentiment_rows(4))]
    logps = score_pairs(SequenceScorer(make_tiny_model(tokenizer)), pairs, 4, tokenizer.pad_token_id)
    m = preference_metrics(build_objective([{"name": "sigmoid"}]), logps, logps)
    assert m["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert m["rewards/accuracies"] == 0 and m["rewards/margins"] == 0 and m["num_pairs"] == 4
    expected = (logps.chosen > logps.rejected).float().mean().item()
    assert m["pref/logp_accuracy"] == pytest.approx(expected)


def test_score_sequences_keeps_the_input_order(tokenizer):
    scorer = SequenceScorer(make_tiny_model(tokenizer))
    rows = [((1, 2, 3), tuple(range(4, 4 + n))) for n in (9, 1, 5, 12, 3)]
    logps, counts = score_sequences(scorer, rows, tokenizer.pad_token_id, 2)
    assert counts.tolist() == [9, 1, 5, 12, 3]
    for i, row in enumerate(rows):
        alone, _ = score_sequences(scorer, [row], tokenizer.pad_token_id, 1)
        assert_close(logps[i], alone[0], atol=1e-5, rtol=0)
    assert score_sequences(scorer, [], tokenizer.pad_token_id, 2)[0].shape == (0,)
