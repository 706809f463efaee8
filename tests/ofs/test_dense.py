"""Dense combinations (COFS-DPO for any parametrization): the mixture θ₀ + Σ c_k ΔW_k on a live model equals the
folded weights, differentiates in c, keeps a tied tensor tied; the change of a module is W' − W."""

import copy

import pytest
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


def test_modules_changing_different_tensors_combine_in_the_model_dtype(tokenizer):
    """Module 1 moves q_proj, module 2 v_proj: each is absent from the other's delta; weight 1 is a weight like any
    other; in bf16 the mixture and the folded weights stay in bf16 and agree."""
    base = make_tiny_model(tokenizer, seed=1)
    q, v = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    deltas = [dense_delta(_moved(base, 2, (q,)), base), dense_delta(_moved(base, 3, (v,)), base)]
    assert set(deltas[0]) == {q} and set(deltas[1]) == {v}
    batch, coeffs = _batch(tokenizer), [1.0, 0.5]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.5)):
        folded = copy.deepcopy(base).to(dtype)
        fold_dense(folded, deltas, coeffs)
        for name, k in ((q, 0), (v, 1)):
            want = base.get_parameter(name).detach() + coeffs[k] * deltas[k][name]
            torch.testing.assert_close(folded.get_parameter(name).float(), want, rtol=0,
                                       atol=1e-7 if dtype == torch.float32 else 2e-2)
        live = copy.deepcopy(base).to(dtype)
        mixture = DenseMixture(live, deltas)
        assert mixture.model is live and not any(p.requires_grad for p in live.parameters())
        with torch.no_grad():
            plain = SequenceScorer(copy.deepcopy(base).to(dtype))(**batch.scorer_inputs())[0]
            torch.testing.assert_close(SequenceScorer(live)(**batch.scorer_inputs())[0], plain, rtol=0, atol=0)
            mixture.set(torch.tensor(coeffs))
            assert live.get_submodule(q.rsplit('.', 1)[0]).weight.dtype == dtype
            torch.testing.assert_close(SequenceScorer(live)(**batch.scorer_inputs())[0],
                                       SequenceScorer(folded)(**batch.scorer_inputs())[0], rtol=0, atol=tol)
        assert not any(k.endswith("deltas") for k in live.state_dict())  # the stored modules are no weights


def test_a_delta_is_what_changed_in_floating_tensors_both_models_hold(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self, extra: bool):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))
            self.count = torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)
            if extra:
                self.extra = torch.nn.Parameter(torch.ones(2))

    start, trained = Net(False), Net(True)
    with torch.no_grad():
        trained.w[1] = 2.0
        trained.count += 5
    delta = dense_delta(trained, start)
    assert list(delta) == ["w"] and torch.equal(delta["w"], torch.tensor([0.0, 2.0, 0.0]))
    save_delta(delta, tmp_path / "a" / "b")  # parents made
    assert torch.equal(read_delta(tmp_path / "a" / "b")["w"], delta["w"])
    low = Net(False).to(torch.bfloat16)
    with torch.no_grad():
        low.w.fill_(1.0)
    fold_dense(low, [{"w": torch.full((3,), 2 ** -8 + 2 ** -17)}], [1.0])  # rounding the delta first would lose it
    assert low.w.dtype == torch.bfloat16 and low.w.tolist() == [1.0078125] * 3
    with pytest.raises(ValueError, match=r"the stored modules change tensors the model does not hold: \['extra'\]"):
        DenseMixture(Net(False), [{"w": torch.ones(3), "extra": torch.ones(2)}])
    with pytest.raises(ValueError, match=r"does not hold: \['a', 'b', 'c'\]$"):  # the first three named
        DenseMixture(Net(False), [{n: torch.ones(1) for n in "abcd"}])
