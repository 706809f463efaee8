"""What an APO run writes, by value: each iteration's record against its pairs and models on disk (KL to the
previous iterate, extrapolation norm, scores), the returned model, the extrapolated model's own evaluation,
prompt slices, the errors a run can meet, and the weight arithmetic helpers."""

import json
import time

import pytest
import torch
from conftest import make_tiny_model, sentiment_rows, write_jsonl

from preflab.config import load_config
from preflab.data.dataset import load_pairs
from preflab.data.tokenize import PairTokenizer
from preflab.eval.preference import score_pairs
from preflab.models.loader import load_model
from preflab.models.scorer import SequenceScorer
from preflab.train import TrainingError, train
from preflab.train.apo import ApoRun, copy_dir_atomically, dense_state, extrapolate


def _cfg(model, out, *extra):
    return load_config(None, [
        "schedule=apo", f"model.name={model}", f"output_dir={out}", "data.eval=null", "eval.task=null",
        "train.progress=false", "diag.enabled=false", "parametrization.kind=full", "apo.task=concision",
        "apo.iterations=2", "apo.prompts_per_iteration=6", "apo.k=4", "apo.max_new_tokens=10", "apo.batch_prompts=6",
        "train.batch_size=4", "train.max_steps=2", "train.lr=1e-2", "train.warmup_ratio=0", *extra])


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("apo-records") / "runs" / "apo"  # (its parent made by the run too)
    start = time.perf_counter()
    held_out = write_jsonl(out.parent.parent / "held_out.jsonl", sentiment_rows(4))
    result = train(_cfg(tiny_model_dir, out, "apo.alpha=0.3", "apo.return_extrapolated=true",
                        "apo.eval_extrapolated=true", "eval.task=concision", "eval.num_prompts=4",
                        "eval.max_new_tokens=6", f"data.eval={held_out}"))
    (out / "test-wall-seconds").write_text(str(time.perf_counter() - start))
    (out / "test-result.json").write_text(json.dumps({k: getattr(result, k) for k in
                                                      ("steps", "seconds", "before", "after", "generation")}))
    return out


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _sequence_logps(model_path, pairs_file, tokenizer):
    pairs, _ = load_pairs(str(pairs_file), "train", PairTokenizer(tokenizer))
    model = load_model(str(model_path)).eval()
    with torch.no_grad():
        logps = score_pairs(SequenceScorer(model), pairs, 8, tokenizer.pad_token_id, "cpu")
    return torch.cat([logps.chosen, logps.rejected])


def test_each_record_is_its_iterations_pairs_and_models(run_dir, tiny_model_dir, tokenizer):
    records = _records(run_dir)
    assert [r["apo/iteration"] for r in records] == [1, 2] and [r["step"] for r in records] == [2, 4]
    for t, r in enumerate(records, start=1):
        it = run_dir / f"iter-{t}"
        stats = json.loads((it / "pairs" / "train.stats.json").read_text())
        assert r["apo/pairs_kept"] == stats["pairs"] > 0 and r["apo/prompts"] == stats["prompts"] == 6
        assert r["apo/score_mean"] == stats["score_all_samples"]["mean"]
        assert (r["apo/score_best"], r["apo/score_worst"], r["apo/score_gap"]) == (
            stats["score_chosen"]["mean"], stats["score_rejected"]["mean"], stats["score_gap"]["mean"])
        assert r["apo/alpha"] == 0.3 and r["apo/train_steps"] == 2
        # KL(π_t ‖ π̂_{t+1}) on the iteration's responses (samples of π_t): mean of log π_t − log π̂_{t+1}
        start = tiny_model_dir if t == 1 else run_dir / "iter-1" / "extrapolated"
        kl = (_sequence_logps(start, it / "pairs" / "train.jsonl", tokenizer)
              - _sequence_logps(it / "policy", it / "pairs" / "train.jsonl", tokenizer)).mean().item()
        assert r["apo/kl_to_prev"] == pytest.approx(kl, rel=1e-4, abs=1e-5)
        hat, theta = dense_state(load_model(str(it / "policy"))), dense_state(load_model(str(it / "extrapolated")))
        norm = torch.sqrt(sum(((theta[k] - hat[k]) ** 2).sum() for k in hat)).item()
        assert r["apo/extrap_norm"] == pytest.approx(norm, rel=1e-4) and norm > 0
        wall = float((run_dir / "test-wall-seconds").read_text())
        times = [r[key] for key in ("time/generation_seconds", "time/training_seconds", "time/eval_seconds")]
        assert all(x >= 0 for x in times) and sum(times) <= wall + 0.05  # each a part of the run's own time
        after = json.loads((it / "train" / "eval.json").read_text())["after"]  # the iteration's held-out pairs
        assert after and all(r[f"eval/{k}"] == v for k, v in after.items())
        evaluation = json.loads((it / "eval.json").read_text())
        assert r["gold/reward"] == evaluation["policy"]["gold/reward"]
        assert r["gold_extrapolated/reward"] == evaluation["extrapolated"]["gold/reward"]
    # what train() returns: the first iteration's "before", the last one's "after" and generation eval
    result = json.loads((run_dir / "test-result.json").read_text())
    assert result["steps"] == 4 and result["seconds"] == pytest.approx(sum(r["time/training_seconds"] for r in records))
    first, last_train = (json.loads((run_dir / f"iter-{t}" / "train" / "eval.json").read_text()) for t in (1, 2))
    assert result["before"] == first["before"] and result["after"] == last_train["after"] and result["after"]
    assert result["before"] != json.loads((run_dir / "iter-2" / "train" / "eval.json").read_text())["before"]
    assert result["generation"] == json.loads((run_dir / "iter-2" / "eval.json").read_text())["policy"]
    # apo.return_extrapolated: final/ is the last extrapolated model (the checks share the fixture's run: mutation
    # testing credits a module fixture's run to the first test that uses it)
    final = dense_state(load_model(str(run_dir / "final")))
    last = dense_state(load_model(str(run_dir / "iter-2" / "extrapolated")))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    hat2, hat1 = (dense_state(load_model(str(run_dir / f"iter-{t}" / "policy"))) for t in (2, 1))
    for k in final:  # extrapolated after the last iteration too, from θ̂_2 and θ̂_1
        torch.testing.assert_close(final[k], 1.3 * hat2[k] - 0.3 * hat1[k], rtol=0, atol=2e-6)


@pytest.mark.parametrize("schedule", ["disjoint", "reuse"])
def test_prompt_slices(tiny_model_dir, tmp_path, schedule):
    out = tmp_path / schedule
    train(_cfg(tiny_model_dir, out, "apo.alpha=0", f"apo.prompt_schedule={schedule}", "apo.k=2",
               "apo.min_score_gap=-1"))
    prompts = [{json.loads(line)["prompt"][0]["content"] for line in
                (out / f"iter-{t}" / "pairs" / "train.jsonl").read_text().splitlines()} for t in (1, 2)]
    offsets = [json.loads((out / f"iter-{t}" / "pairs" / "train.stats.json").read_text())["config"]["offset"]
               for t in (1, 2)]
    if schedule == "disjoint":
        assert offsets == [0, 6] and not prompts[0] & prompts[1]
    else:
        assert offsets == [0, 0] and prompts[0] & prompts[1]



def test_no_pair_in_an_iteration_stops_with_what_to_change(tiny_model_dir, tmp_path):
    with pytest.raises(TrainingError, match=r"apo iteration 1: no pair from 6 prompts .*raise apo.k or "
                                            r"apo.temperature"):
        train(_cfg(tiny_model_dir, tmp_path / "r", "apo.min_score_gap=100"))


def test_dense_state_keeps_floating_tensors_as_fp32_copies(tokenizer):
    model = make_tiny_model(tokenizer).to(torch.bfloat16)
    model.register_buffer("steps", torch.tensor([3]))
    state = dense_state(model)
    assert "steps" not in state and state and all(v.dtype == torch.float32 for v in state.values())
    key = next(iter(state))
    state[key].add_(1)  # a copy: the model is untouched
    assert not torch.equal(state[key], model.state_dict()[key].float())
    fp32 = make_tiny_model(tokenizer)
    state = dense_state(fp32)
    state[key].add_(1)  # a copy also where no conversion is needed
    assert not torch.equal(state[key], fp32.state_dict()[key])


def test_extrapolate_in_fp32_and_names_a_missing_anchor():
    new = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    for prev in ({"w": torch.tensor([0.5, 2.5])}, {"w": torch.tensor([0.5, 2.5], dtype=torch.bfloat16)}):
        out = extrapolate(new, prev, 0.5)
        assert out["w"].dtype == torch.float32 and out["w"].tolist() == [1.25, 1.75]
    assert extrapolate(new, prev, 0.0) is new
    with pytest.raises(ValueError, match=r"^extrapolation anchor lacks tensors \['w'\]"):
        extrapolate(new, {}, 0.5)
    many = {name: torch.zeros(1) for name in "abcd"}
    with pytest.raises(ValueError, match=r"^extrapolation anchor lacks tensors \['a', 'b', 'c'\]: the two models"):
        extrapolate(many, {}, 0.5)  # the first three named


def test_copy_dir_atomically_replaces_what_was_there(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "a.txt").write_text("new")
    out.mkdir()
    (out / "stale.txt").write_text("old")
    copy_dir_atomically(src, out)
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"] and (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_start_model_and_base(tiny_model_dir, tmp_path):
    run = ApoRun(_cfg(tiny_model_dir, tmp_path / "r", "apo.alpha=0.3", "model.attn_implementation=eager"))
    assert run.start_model(0) == str(tiny_model_dir)
    assert run.start_model(1) == str(tmp_path / "r" / "iter-1" / "extrapolated")
    plain = ApoRun(_cfg(tiny_model_dir, tmp_path / "p", "apo.alpha=0"))
    assert plain.start_model(1) == str(tmp_path / "p" / "iter-1" / "policy")
    base = run.base()
    assert base is run.base() and not base.training and not any(p.requires_grad for p in base.parameters())
    assert base.config._attn_implementation == "eager"  # the run's model settings


def test_an_iteration_trains_its_pairs_from_its_start_model(tiny_model_dir, tmp_path):
    """The inner run of iteration t: its own directory (resumable whatever the outer run's resume), the start model
    θ_t, the iteration's pairs, apo.epochs_per_iteration, no generation eval of its own (the driver's is against θ_0),
    the inner schedule."""
    run = ApoRun(_cfg(tiny_model_dir, tmp_path / "r", "apo.alpha=0.3", "apo.epochs_per_iteration=2.5",
                      "eval.task=concision", "resume=never"))
    inner = run.inner_config(1, tmp_path / "pairs.jsonl")
    assert inner.resume == "auto" and inner.output_dir == str(tmp_path / "r" / "iter-2" / "train")
    assert inner.model.name == run.start_model(1) and inner.data.train == str(tmp_path / "pairs.jsonl")
    assert inner.train.epochs == 2.5 and inner.train.max_steps == 2 and inner.eval.task is None
    assert inner.schedule == "offline" and run.config.eval.task == "concision"


def test_an_iteration_samples_its_own_prompt_slice_with_its_own_seed(tiny_model_dir, tmp_path, monkeypatch):
    seen = []

    class Stop(Exception):
        pass

    def build_pairs(cfg, out, **kwargs):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr("preflab.train.apo.build_pairs", build_pairs)
    run = ApoRun(_cfg(tiny_model_dir, tmp_path / "r", "seed=7", "apo.iterations=3", "apo.alpha=0.3",
                      "apo.temperature=0.5", "apo.top_p=0.8", "apo.min_score_gap=0.25", "apo.reward=concision"))
    with pytest.raises(Stop):
        run.sample_pairs(2)
    cfg = seen[0]
    assert (cfg.task, cfg.split, cfg.model, cfg.num_prompts, cfg.offset) == (
        "concision", "train", run.start_model(2), 6, 12)  # disjoint slices: iteration 3 takes prompts 12..17
    assert (cfg.k, cfg.min_gap, cfg.batch_prompts, cfg.seed, cfg.sample_seed, cfg.reward) == (
        4, 0.25, 6, 7, 7002, "concision")
    assert (cfg.sampling.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_p) == (10, 0.5, 0.8)
