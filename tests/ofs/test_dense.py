"""Dense combinations (COFS-DPO for any parametrization): the mixture θ₀ + Σ c_k ΔW_k on a live model equals the
folded weights, differentiates in c, keeps a tied tensor tied; the change of a module is W' − W."""

import copy

import torch
from conftest import make_tiny_model, sentiment_rows

from preflab.data.collate import collate_pairs
from preflab.data.formats import normalize_row
from preflab.data.tokenize import PairTokenizer
from preflab.models.scorer import SequenceScorer
from preflab.ofs.dense import DenseMixture, dense_delta, fold_dense, read_delta, save_delta


def _batch(tokenizer):
    pt = PairTokenizer(tokenizer)
    return collate_pairs([pt(normalize_row(r, str(i))) for i, r in enumerate(sentiment_rows(3))],
                         tokenizer.pad_token_id, "shared")


def _moved(model, seed, names=("model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight")):
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            p = out.get_parameter(name)
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return out


def test_mixture_equals_folding_differentiates_and_keeps_tied_weights_tied(tokenizer, tmp_path):
    base = make_tiny_model(tokenizer, seed=1)
    assert base.lm_head.weight is base.model.embed_tokens.weight  # tied
    deltas = [dense_delta(_moved(base, s), base) for s in (2, 3)]
    assert set(deltas[0]) == {"model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"}
    save_delta(deltas[0], tmp_path)
    assert all(torch.equal(read_delta(tmp_path)[k], v) for k, v in deltas[0].items())
    batch, coeffs = _batch(tokenizer), [0.3, 0.7]
    folded = copy.deepcopy(base)
    fold_dense(folded, deltas, coeffs)
    assert folded.lm_head.weight is folded.model.embed_tokens.weight
    with torch.no_grad():
        want = SequenceScorer(folded)(**batch.scorer_inputs())[0]
    live = copy.deepcopy(base)
    mixture = DenseMixture(live, deltas)
    mixture.set(None)
    with torch.no_grad():
        torch.testing.assert_close(SequenceScorer(live)(**batch.scorer_inputs())[0],
                                   SequenceScorer(base)(**batch.scorer_inputs())[0], rtol=0, atol=0)
    c = torch.tensor(coeffs, dtype=torch.float64, requires_grad=True)
    mixture.set(c)
    got = SequenceScorer(live)(**batch.scorer_inputs())[0]
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(live.lm_head.weight, live.model.embed_tokens.weight)  # the head sees the mixed embedding
    got.sum().backward()
    assert c.grad is not None and torch.isfinite(c.grad).all() and c.grad.abs().sum() > 0
