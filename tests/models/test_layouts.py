"""Prefix sharing and packing compute what the padded layout computes: log-probs, losses and gradients."""

import pytest
import torch
from conftest import make_tiny_model, sentiment_rows
from torch.testing import assert_close

from preflab.data.collate import _pack, collate_pairs
from preflab.data.formats import normalize_row
from preflab.data.tokenize import PairTokenizer, TokenizedPair
from preflab.losses import PairLogps, build_objective
from preflab.models.scorer import SequenceScorer

LAYOUTS = [("shared", 4096), ("packed", 4096), ("packed", 90)]


def _pairs(tokenizer):
    rows = sentiment_rows(6)
    rows[1]["chosen"][0]["content"] = "A much longer answer, with many more tokens than the others. " * 5
    rows[2]["prompt"][0]["content"] = "A long prompt that goes on and on about the weather. " * 6
    rows[4]["rejected"][0]["content"] = "No."
    pt = PairTokenizer(tokenizer)
    pairs = [pt(normalize_row(r, f"row {i}")) for i, r in enumerate(rows)]
    # no prompt at all (the first response token is unscorable in every layout) and a one-token prompt
    pairs.append(TokenizedPair((), (5, 6, 7, 8), (9, 10)))
    pairs.append(TokenizedPair((11,), (12,), (13, 14, 15)))
    return pairs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout,budget", LAYOUTS)
def test_logps_equal_padded(tokenizer, attn, layout, budget):
    model = make_tiny_model(tokenizer, seed=3)
    model.config._attn_implementation = attn
    pairs = _pairs(tokenizer)
    padded = collate_pairs(pairs, tokenizer.pad_token_id)
    other = collate_pairs(pairs, tokenizer.pad_token_id, layout, budget)
    with torch.no_grad():
        want, want_n, _ = SequenceScorer(model, chunk_size=5)(**padded.scorer_inputs())
        got, got_n, _ = SequenceScorer(model, chunk_size=5)(**other.scorer_inputs())
    assert_close(got, want, atol=1e-5, rtol=0)
    assert torch.equal(got_n, want_n)
    assert other.num_tokens == padded.num_tokens  # tokens are counted as the peer counts them, whatever the layout
    assert other.input_ids.numel() < padded.input_ids.numel()


@pytest.mark.parametrize("ld_alpha", [None, 0.5])  # LD-DPO: the shared-length log-probs carry gradients too
@pytest.mark.parametrize("layout,budget", LAYOUTS)
def test_loss_and_gradients_equal_padded(tokenizer, layout, budget, ld_alpha):
    objective = build_objective([{"name": "sigmoid", "beta": 0.1, "ld_alpha": ld_alpha}])
    pairs = _pairs(tokenizer)
    b = len(pairs)
    ref = torch.linspace(-60, -20, 2 * b), torch.linspace(-40, -10, 2 * b)

    def loss_and_grads(layout, budget=4096):
        model = make_tiny_model(tokenizer, seed=4).train()  # dropout is 0 in the tiny config
        batch = collate_pairs(pairs, tokenizer.pad_token_id, layout, budget)
        scores = SequenceScorer(model, chunk_size=16)(**batch.scorer_inputs())
        loss = objective(PairLogps.of_batch(b, scores, ref)).losses.mean()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    want_loss, want = loss_and_grads("padded")
    got_loss, got = loss_and_grads(layout, budget)
    assert_close(got_loss, want_loss, atol=1e-6, rtol=0)
    for name in want:
        assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_branches_do_not_see_each_other(tokenizer):
    """Chosen's log-prob does not change when rejected's tokens do (and the other way round), nor when another
    pair packed into the same row changes."""
    model = make_tiny_model(tokenizer, seed=5)
    pairs = _pairs(tokenizer)[:3]
    changed = [TokenizedPair(pairs[0].prompt_ids, pairs[0].chosen_ids, (7,) * 9), *pairs[1:]]
    other_pair = [pairs[0], pairs[1], TokenizedPair(pairs[2].prompt_ids[:3], (9, 9), (8,))]
    with torch.no_grad():
        logps = [SequenceScorer(model)(**collate_pairs(p, tokenizer.pad_token_id, "packed").scorer_inputs())[0]
                 for p in (pairs, changed, other_pair)]
    assert collate_pairs(pairs, tokenizer.pad_token_id, "packed").input_ids.shape[0] == 1
    assert_close(logps[1][0], logps[0][0], atol=1e-5, rtol=0)  # chosen of pair 0 unchanged
    assert not torch.allclose(logps[1][3], logps[0][3])  # its rejected did change
    assert_close(logps[2][:2], logps[0][:2], atol=1e-5, rtol=0)
    assert_close(logps[2][3:5], logps[0][3:5], atol=1e-5, rtol=0)


def test_packing_respects_the_budget(tokenizer):
    lengths = [50, 130, 70, 20, 60, 10, 90]
    rows = _pack(lengths, 120)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 120 or len(row) == 1 for row in rows)
    assert len(rows) == 4  # first fit, longest first: [130] [90 20 10] [70 50] [60]
    pairs = _pairs(tokenizer)
    batch = collate_pairs(pairs, tokenizer.pad_token_id, "packed", pack_tokens=120)
    sizes = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) + (len(p.prompt_ids) > 0) for p in pairs]
    assert batch.input_ids.shape == (len(_pack(sizes, 120)), max(sum(sizes[i] for i in r) for r in _pack(sizes, 120)))
    assert batch.input_ids.shape[0] < len(pairs)


def test_kernels_without_4d_masks_are_refused(tokenizer):
    model = make_tiny_model(tokenizer)
    model.config._attn_implementation = "flash_attention_2"
    batch = collate_pairs(_pairs(tokenizer)[:2], tokenizer.pad_token_id, "shared")
    with pytest.raises(ValueError, match="scorer.layout=padded"):
        SequenceScorer(model)(**batch.scorer_inputs())
