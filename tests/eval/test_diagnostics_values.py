"""3D diagnostics by value: the seen pairs and probe rows each kind selects, the metrics against a per-row
computation, the sampling of the reference probe, and the flags against the definitions of the spec (§4) on
histories that hit every boundary."""

import itertools
import random
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model, prepare_probe, sentiment_rows

from preflab.config import DiagConfig
from preflab.data.collate import collate_sequences
from preflab.data.formats import normalize_row
from preflab.data.tokenize import PairTokenizer
from preflab.eval import diagnostics
from preflab.eval.diagnostics import ThreeDProbe
from preflab.models.scorer import SequenceScorer


@pytest.fixture(scope="module")
def pairs(tokenizer):
    pt = PairTokenizer(tokenizer)
    return [pt(normalize_row(r, str(i))) for i, r in enumerate(sentiment_rows(6))]


def _probe(tokenizer, pairs, kind="cross_prompt", seen=4, heldout=(), seed=0):
    cfg = DiagConfig(seen_pairs=seen, probe_kind=kind, probe_prompts=2, probe_samples=2, probe_max_new_tokens=5,
                     probe_temperature=0.7)
    return ThreeDProbe(cfg, pairs, list(heldout), seed=seed, pad_id=tokenizer.pad_token_id, batch_size=2)


def _row_logp(model, prompt, response, pad_id) -> float:
    """One row on its own: the summed log-prob of its response."""
    batch = collate_sequences([(prompt, response)], pad_id)
    with torch.no_grad():
        return SequenceScorer(model)(**batch.scorer_inputs())[0][0].item()


def test_seen_pairs_are_a_seeded_sample_and_cross_prompt_rows_pair_each_prompt_with_the_next_chosen(tokenizer, pairs):
    probe = _probe(tokenizer, pairs)
    seen = random.Random("3d-seen-0").sample(pairs, 4)
    assert probe.seen_rows == [(p.prompt_ids, p.chosen_ids) for p in seen] + [(p.prompt_ids, p.rejected_ids)
                                                                              for p in seen]
    assert probe.probe_rows == [(seen[i].prompt_ids, seen[(i + 1) % 4].chosen_ids) for i in range(4)]
    assert _probe(tokenizer, pairs).seen_rows == probe.seen_rows != _probe(tokenizer, pairs, seed=1).seen_rows
    assert len(_probe(tokenizer, pairs, seen=2).probe_rows) == 2
    assert _probe(tokenizer, pairs, seen=1).probe_rows == []  # one pair: no other pair's response to borrow
    assert _probe(tokenizer, pairs, kind="reference_samples").probe_rows == []  # sampled by sample()


def test_measure_before_prepare_says_so(tokenizer, pairs):
    with pytest.raises(RuntimeError, match=r"^ThreeDProbe.prepare\(\) must run before measure\(\)$"):
        _probe(tokenizer, pairs).measure(None, "cpu")


@pytest.mark.parametrize("seen", [4, 2])
def test_metrics_equal_a_row_by_row_computation(tokenizer, pairs, seen):
    reference, policy = make_tiny_model(tokenizer, seed=3), make_tiny_model(tokenizer, seed=4)
    probe = _probe(tokenizer, pairs, seen=seen, heldout=[pairs[0].prompt_ids])  # cross_prompt: never sampled

    @contextmanager
    def ref():
        yield reference

    cross = list(probe.probe_rows)
    prepare_probe(probe, ref, tokenizer, 16)
    assert probe.probe_rows == cross  # held-out prompts given, but cross_prompt samples nothing
    out = probe.measure(SequenceScorer(policy, 16), "cpu", log_grad_ratio=1.5)
    pad = tokenizer.pad_token_id
    rho = lambda rows: torch.tensor([_row_logp(policy, p, r, pad) - _row_logp(reference, p, r, pad) for p, r in rows],
                                    dtype=torch.float64)
    n = len(probe.seen_rows) // 2
    probe_rho = rho(probe.probe_rows)
    counts = torch.tensor([len(r) for _, r in probe.probe_rows], dtype=torch.float64)
    want = {"3d/seen_chosen": rho(probe.seen_rows[:n]).mean(), "3d/seen_rejected": rho(probe.seen_rows[n:]).mean(),
            "3d/probe_logratio": probe_rho.mean(), "3d/probe_logratio_per_token": (probe_rho / counts).mean(),
            "3d/probe_logratio_std": probe_rho.std()}
    for key, value in want.items():
        assert out[key] == pytest.approx(value.item(), rel=1e-4, abs=1e-5), key
    assert probe.history[-1]["log_grad_ratio"] == 1.5 and probe.history[-1]["3d/seen_chosen"] == out["3d/seen_chosen"]


def test_one_probe_row_has_no_spread_and_no_probe_kind_has_no_probe_metrics(tokenizer, pairs):
    model = make_tiny_model(tokenizer, seed=3)

    @contextmanager
    def ref():
        yield model

    single = _probe(tokenizer, pairs, seen=2)
    single.probe_rows = single.probe_rows[:1]
    prepare_probe(single, ref, tokenizer, 16)
    assert single.measure(SequenceScorer(model, 16), "cpu")["3d/probe_logratio_std"] == 0.0
    none = _probe(tokenizer, pairs, kind="none")
    prepare_probe(none, ref, tokenizer, 16)
    assert not any(k.startswith("3d/probe") for k in none.measure(SequenceScorer(model, 16), "cpu"))


def test_reference_samples_are_drawn_in_seeded_batches_with_the_configured_sampling(tokenizer, pairs, monkeypatch,
                                                                                      tmp_path):
    calls = []

    def fake_generate(model, tok, prompts, k, sampling, seed):
        calls.append((list(prompts), k, sampling.max_new_tokens, sampling.temperature, seed))
        return [[SimpleNamespace(prompt_ids=p, response_ids=(7, i)) for i in range(k)] + [
            SimpleNamespace(prompt_ids=p, response_ids=())] for p in prompts]  # an empty sample is dropped

    monkeypatch.setattr(diagnostics, "generate", fake_generate)
    heldout = [p.prompt_ids for p in pairs[:3]]
    probe = _probe(tokenizer, pairs, kind="reference_samples", heldout=heldout, seed=2)
    probe.cfg = DiagConfig(seen_pairs=4, probe_prompts=3, probe_samples=2, probe_max_new_tokens=5,
                           probe_temperature=0.7)
    model = make_tiny_model(tokenizer)

    @contextmanager
    def ref():
        yield model

    prepare_probe(probe, ref, tokenizer, 16, cache=tmp_path / "probe.jsonl")
    assert calls == [(heldout[:2], 2, 5, 0.7, 2_000_006), (heldout[2:], 2, 5, 0.7, 2_000_007)]
    assert probe.probe_rows == [(p, (7, i)) for p in heldout for i in range(2)]
    again = _probe(tokenizer, pairs, kind="reference_samples", heldout=heldout, seed=2)
    prepare_probe(again, ref, tokenizer, 16, cache=tmp_path / "probe.jsonl")
    assert again.probe_rows == probe.probe_rows and len(calls) == 2  # read back, not sampled again
    assert [p.name for p in tmp_path.iterdir()] == ["probe.jsonl"]


def _spec_flags(history, w):
    """§4 of the 3D spec: P1, P2 over the last w+1 probes, P3 on the last one."""
    last = history[-1]
    p3 = last["3d/seen_chosen"] < 0 and last["3d/seen_rejected"] < 0
    if len(history) < w + 1:
        return 0.0, 0.0, float(p3)
    window = history[-(w + 1):]
    first = window[0]
    d_chosen = last["3d/seen_chosen"] - first["3d/seen_chosen"]
    d_rejected = last["3d/seen_rejected"] - first["3d/seen_rejected"]
    unknown = first["log_grad_ratio"] is None or last["log_grad_ratio"] is None
    grew = unknown or last["log_grad_ratio"] > first["log_grad_ratio"]
    p1 = d_rejected < 0 and -d_rejected > max(d_chosen, 0.0) and grew
    decreasing = all(window[i + 1]["3d/seen_chosen"] < window[i]["3d/seen_chosen"] for i in range(w))
    below_max = last["3d/seen_chosen"] < max(h["3d/seen_chosen"] for h in history)
    p2 = decreasing and below_max and d_rejected < 0
    return float(p1), float(p2), float(p3)


def test_flags_follow_the_definitions_on_histories_that_hit_every_boundary():
    rng = random.Random(0)
    values, grads = [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0], [None, 0.0, 1.0, 2.0]
    cases, raised = 0, [0, 0, 0]
    for w, length in itertools.product((1, 2, 3), range(1, 7)):
        for _ in range(150):
            history = [{"3d/seen_chosen": rng.choice(values), "3d/seen_rejected": rng.choice(values),
                        "log_grad_ratio": rng.choice(grads)} for _ in range(length)]
            probe = ThreeDProbe(DiagConfig(window=w, probe_kind="none"), [], [], 0, 0, 1)
            probe.history = history
            got = probe.flags()
            want = _spec_flags(history, w)
            assert (got["3d/p1"], got["3d/p2"], got["3d/p3"]) == want, (w, history)
            cases += 1
            raised = [n + f for n, f in zip(raised, want)]
    assert cases == 2700 and min(raised) >= 20  # every flag raised often enough to be tested
