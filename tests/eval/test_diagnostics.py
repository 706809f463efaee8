"""3D diagnostics: exactly zero at the reference, the flags' logic, and their place in a run."""

import json
from contextlib import contextmanager

import pytest
from conftest import make_tiny_model, prepare_probe, sentiment_rows, write_jsonl

from preflab.config import DiagConfig, load_config
from preflab.data.formats import normalize_row
from preflab.data.tokenize import PairTokenizer
from preflab.eval.diagnostics import ThreeDProbe
from preflab.models.scorer import SequenceScorer
from preflab.train import train


@pytest.mark.parametrize("kind", ["reference_samples", "cross_prompt"])
def test_policy_equal_to_reference_measures_exactly_zero(tokenizer, kind):
    model = make_tiny_model(tokenizer, seed=7)
    pt = PairTokenizer(tokenizer)
    pairs = [pt(normalize_row(r, str(i))) for i, r in enumerate(sentiment_rows(6))]
    cfg = DiagConfig(seen_pairs=4, probe_kind=kind, probe_prompts=3, probe_samples=2, probe_max_new_tokens=6)
    probe = ThreeDProbe(cfg, pairs, [p.prompt_ids for p in pairs[:3]], seed=0, pad_id=tokenizer.pad_token_id,
                        batch_size=4)

    @contextmanager
    def same():
        yield model

    prepare_probe(probe, same, tokenizer, 64)
    assert probe.probe_rows
    out = probe.measure(SequenceScorer(model, 64), "cpu")
    for key in ("3d/seen_chosen", "3d/seen_rejected", "3d/probe_logratio", "3d/probe_logratio_per_token"):
        assert out[key] == 0.0, key
    assert out["3d/p1"] == out["3d/p2"] == out["3d/p3"] == 0.0


def test_the_plan_says_what_the_preparation_will_sample_score_or_read(tokenizer, tmp_path, caplog):
    pt = PairTokenizer(tokenizer)
    pairs = [pt(normalize_row(r, str(i))) for i, r in enumerate(sentiment_rows(6))]
    prompts = [p.prompt_ids for p in pairs[:5]]
    tail = (" under the reference, once before the first step (diag.probe_prompts, diag.probe_max_new_tokens and "
            "diag.seen_pairs size it; diag.enabled=false skips it)")
    cfg = DiagConfig(seen_pairs=4, probe_prompts=3, probe_samples=2, probe_max_new_tokens=6)
    probe = ThreeDProbe(cfg, pairs, prompts, seed=0, pad_id=tokenizer.pad_token_id, batch_size=2)
    cache = tmp_path / "probe.jsonl"
    assert probe.plan(cache) == ("3D diagnostics: scoring 4 seen pairs, sampling 6 probe responses (3 held-out "
                                 "prompts x 2, up to 6 new tokens) and scoring them" + tail)
    few = ThreeDProbe(DiagConfig(probe_prompts=64), pairs, prompts[:2], 0, tokenizer.pad_token_id, 2)
    assert "sampling 4 probe responses (2 held-out prompts x 2, up to 256 new tokens)" in few.plan(None)
    cache.write_text("")
    assert probe.plan(cache) == f"3D diagnostics: scoring 4 seen pairs and the probe responses stored in {cache}" + tail
    cross = ThreeDProbe(DiagConfig(seen_pairs=4, probe_kind="cross_prompt"), pairs, prompts, 0, 0, 2)
    assert cross.plan(None) == "3D diagnostics: scoring 4 seen pairs and 4 cross-prompt probe responses" + tail
    for kind, held in (("none", prompts), ("reference_samples", [])):  # nothing to sample
        alone = ThreeDProbe(DiagConfig(seen_pairs=4, probe_kind=kind), pairs, held, 0, 0, 2)
        assert alone.plan(None) == "3D diagnostics: scoring 4 seen pairs" + tail
    caplog.set_level("INFO", logger="preflab.progress")
    model = make_tiny_model(tokenizer, seed=7)

    @contextmanager
    def same():
        yield model

    prepare_probe(probe, same, tokenizer, 64)  # 3 prompts, 2 a batch: two sampling batches
    lines = [r.getMessage() for r in caplog.records if r.name == "preflab.progress"]
    assert [line.split(" (")[0] for line in lines] == ["3D probe: sampling from the reference 1/2 batches",
                                                       "3D probe: sampling from the reference 2/2 batches"]


def _probe_with_history(values, window=3):
    probe = ThreeDProbe(DiagConfig(window=window, probe_kind="none"), [], [], 0, 0, 1)
    probe.history = [{"3d/seen_chosen": c, "3d/seen_rejected": r, "log_grad_ratio": g} for c, r, g in values]
    return probe.flags()


def test_flags():
    # P1: rejected falls by 3, chosen rises by 1, gradient ratio grows
    assert _probe_with_history([(0, 0, 1), (0.5, -1, 2), (0.8, -2, 3), (1.0, -3, 4)])["3d/p1"] == 1.0
    assert _probe_with_history([(0, 0, 1), (1, -0.2, 2), (2, -0.3, 3), (3, -0.4, 4)])["3d/p1"] == 0.0
    # P2: chosen falls for a whole window after its maximum while rejected still falls
    assert _probe_with_history([(0, 0, 0), (2, -1, 0), (1.5, -2, 0), (1, -3, 0), (0.5, -4, 0)])["3d/p2"] == 1.0
    assert _probe_with_history([(0, 0, 0), (2, -1, 0), (1.5, -2, 0), (1.7, -3, 0), (0.5, -4, 0)])["3d/p2"] == 0.0
    # P3: both below the reference
    assert _probe_with_history([(-0.1, -0.5, 0)])["3d/p3"] == 1.0
    assert _probe_with_history([(0.1, -0.5, 0)])["3d/p3"] == 0.0


def test_diagnostics_in_a_run_and_reused_probe_on_resume(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sentiment_rows(8))
    args = [f"model.name={tiny_model_dir}", f"data.train={data}", f"data.eval={data}", f"output_dir={tmp_path / 'r'}",
            "train.progress=false", "train.batch_size=4", "train.lr=1e-2", "train.save_steps=2", "diag.seen_pairs=4",
            "diag.probe_prompts=3", "diag.probe_samples=1", "diag.probe_max_new_tokens=5", "diag.probe_every=2"]
    train(load_config(None, args + ["train.max_steps=2"]))
    probe_file = (tmp_path / "r" / "probe.jsonl").read_text()
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert "3d/seen_chosen" not in records[0] and "3d/seen_chosen" in records[1]
    for key in ("3d/log_grad_ratio", "3d/chosen_down_frac", "3d/logratio_chosen_per_token"):
        assert key in records[0]
    assert records[1]["3d/seen_chosen"] != 0.0 and "3d/probe_logratio" in records[1] and "3d/p3" in records[1]
    train(load_config(None, args + ["train.max_steps=4"]))  # continues the same run directory
    assert (tmp_path / "r" / "probe.jsonl").read_text() == probe_file  # sampled once, reused
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and "3d/seen_rejected" in records[3]
