"""The scorer equals the naive full-logits computation, masks what it must, and is layout-independent (T4)."""

import pytest
import torch
from conftest import make_tiny_model, sentiment_rows
from torch.testing import assert_close

from preflab.data.collate import collate_pairs
from preflab.data.formats import normalize_row
from preflab.data.tokenize import PairTokenizer, TokenizedPair
from preflab.models.scorer import SequenceScorer


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_model(tokenizer, seed=1)


def _pairs(tokenizer, n=6):
    rows = sentiment_rows(n)
    rows[1]["chosen"][0]["content"] = "A much longer answer. " * 6  # very different lengths in one batch
    pt = PairTokenizer(tokenizer)
    return [pt(normalize_row(r, f"row {i}")) for i, r in enumerate(rows)]


def _hand_gathered(model, pair_prompt, response):
    ids = torch.tensor([list(pair_prompt) + list(response)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
    start = len(pair_prompt)
    return sum(logp[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))


def test_chunked_equals_full_logits_and_hand_sum(tokenizer, model):
    batch = collate_pairs(_pairs(tokenizer), tokenizer.pad_token_id)
    with torch.no_grad():
        full, n_full, _ = SequenceScorer(model, chunk_size=0)(**batch.scorer_inputs())
        chunked, n_chunked, _ = SequenceScorer(model, chunk_size=7)(**batch.scorer_inputs())
    assert_close(chunked, full, atol=1e-5, rtol=0)
    assert torch.equal(n_full, n_chunked)
    pairs = _pairs(tokenizer)
    for i, p in enumerate(pairs):
        assert chunked[i].item() == pytest.approx(_hand_gathered(model, p.prompt_ids, p.chosen_ids), abs=1e-4)
        assert n_chunked[i].item() == len(p.chosen_ids)
        assert n_chunked[len(pairs) + i].item() == len(p.rejected_ids)


def test_chunked_gradients_equal_full_logits_gradients(tokenizer):
    batch = collate_pairs(_pairs(tokenizer), tokenizer.pad_token_id)
    grads = []
    for chunk in (0, 5):
        model = make_tiny_model(tokenizer, seed=1).train()
        logps, _, _ = SequenceScorer(model, chunk_size=chunk)(**batch.scorer_inputs())
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_prompt_and_padding_positions_do_not_count(tokenizer, model):
    pairs = _pairs(tokenizer, 2)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        base, _, _ = SequenceScorer(model)(**batch.scorer_inputs())
    changed = batch.scorer_inputs()
    ids = changed["input_ids"].clone()
    mask = changed["attention_mask"]
    ids[mask == 0] = 17  # other padding tokens: masked out, so nothing may change
    changed["input_ids"] = ids
    with torch.no_grad():
        after, _, _ = SequenceScorer(model)(**changed)
    assert_close(after, base, atol=1e-5, rtol=0)
    # a different prompt changes the response log-probs (it is context) but not which tokens are scored
    other = [TokenizedPair(p.prompt_ids[:-3] + (42, 43, 44), p.chosen_ids, p.rejected_ids) for p in pairs]
    with torch.no_grad():
        ctx, counts, _ = SequenceScorer(model)(**collate_pairs(other, tokenizer.pad_token_id).scorer_inputs())
    assert not torch.allclose(ctx, base)
    assert counts.tolist() == [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]


def test_left_padding_with_position_ids_equals_right_padding(tokenizer, model):
    pairs = _pairs(tokenizer, 3)
    right = collate_pairs(pairs, tokenizer.pad_token_id)
    inputs = right.scorer_inputs()
    lengths = inputs["attention_mask"].sum(1)
    width = inputs["input_ids"].shape[1]
    left = {k: torch.empty_like(inputs[k]) for k in ("input_ids", "attention_mask", "target_ids", "target_seq")}
    fill = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "target_ids": 0, "target_seq": -1}
    for k in left:
        left[k].fill_(fill[k])
        for r, n in enumerate(lengths.tolist()):
            left[k][r, width - n:] = inputs[k][r, :n]
    position_ids = (left["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        a, _, _ = SequenceScorer(model)(**inputs)
        b, _, _ = SequenceScorer(model)(**left, num_sequences=inputs["num_sequences"], position_ids=position_ids)
    assert_close(b, a, atol=1e-5, rtol=0)
