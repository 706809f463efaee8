"""The multi-domain driver's pieces without training (``schedule: cofs``): which rows each stage's inner run trains
and is held out on, the replay buffers, the driver's own scoring of every domain against θ₀ and the settings that
reach it. The stages themselves are tested in test_cofs.py."""

import json

import pytest
from conftest import sentiment_rows, write_jsonl

import preflab.train.cofs as cofs
from preflab.config import load_config
from preflab.data import sources
from preflab.data.dataset import load_pairs
from preflab.train.cofs import DomainsRun


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _prompts(rows):
    return [r["prompt"][0]["content"] for r in rows]


@pytest.fixture
def builtin(tmp_path, monkeypatch):
    """Two built-in datasets whose splits hold different rows: ``builtin:a`` and ``builtin:b``, splits ``train``
    (12 rows) and ``held`` (6 rows)."""
    root = tmp_path / "datasets"
    for name, offset in (("a", 0), ("b", 100)):
        (root / name).mkdir(parents=True)
        write_jsonl(root / name / "train.jsonl", sentiment_rows(12, offset))
        write_jsonl(root / name / "held.jsonl", sentiment_rows(6, offset + 50))
    monkeypatch.setattr(sources, "BUILTIN_ROOT", root)
    return {name: {split: _prompts(_rows(root / name / f"{split}.jsonl")) for split in ("train", "held")}
            for name in ("a", "b")}


def _run(model_dir, out, *extra) -> DomainsRun:
    """The driver of a run, its stage folders made (as :meth:`DomainsRun.stage` does)."""
    domains = ("data.domains=[{name: a, train: 'builtin:a', eval: 'builtin:a', eval_split: held}, "
               "{name: b, train: 'builtin:b', eval: 'builtin:b', eval_split: held}]")
    run = DomainsRun(load_config(None, [f"model.name={model_dir}", f"output_dir={out}", "schedule=cofs", domains,
                                        "train.progress=false", "diag.enabled=false", "parametrization.kind=lora",
                                        "train.max_steps=3", "cofs.buffer_size=5", *extra]))
    for d in range(len(run.stages())):
        run.stage_dir(d).mkdir(parents=True)
    return run


def test_each_stage_trains_on_its_domain_and_is_held_out_on_the_domains_own_split(tiny_model_dir, builtin, tmp_path):
    run = _run(tiny_model_dir, tmp_path / "run")
    for d, name in enumerate("ab"):
        inner = run.inner_config(d)
        data, domain = inner.data, run.domains[d]
        assert (data.train, data.train_split, data.eval, data.eval_split) == (f"builtin:{name}", "train",
                                                                             f"builtin:{name}", "held")
        assert data.domains == () and inner.schedule == "ofs" and inner.ofs.export == "best_val_fast"
        assert inner.train.max_steps == 3 and inner.resume == "auto" and inner.eval.task is None
        assert inner.output_dir == str(run.stage_dir(d) / "train") and domain.name == name
        assert inner.model.name == (str(tiny_model_dir) if d == 0 else str(run.stage_dir(0) / "model"))
        buffer = _prompts(_rows(run.write_buffer(d)))  # a sample of the domain's training split, in its order
        assert len(buffer) == 5 and set(buffer) <= set(builtin[name]["train"])
        assert buffer == [p for p in builtin[name]["train"] if p in buffer]
    assert not (run.stage_dir(1) / "train.jsonl").exists()  # no replay unless asked for


def test_replay_adds_the_earlier_domains_buffers_from_the_second_stage_on(tiny_model_dir, builtin, tmp_path):
    run = _run(tiny_model_dir, tmp_path / "run", "cofs.replay_in_training=true")
    assert run.inner_config(0).data.train == "builtin:a"  # nothing to replay before the first stage
    assert not (run.stage_dir(0) / "train.jsonl").exists()
    first = _prompts(_rows(run.write_buffer(0)))
    data = run.inner_config(1).data
    assert data.train == str(run.stage_dir(1) / "train.jsonl") and data.eval == "builtin:b"
    assert _prompts(_rows(run.stage_dir(1) / "train.jsonl")) == builtin["b"]["train"] + first


def test_joint_dpo_trains_on_every_domains_training_split_for_d_times_the_steps(tiny_model_dir, builtin, tmp_path):
    run = _run(tiny_model_dir, tmp_path / "run", "cofs.arm=joint_dpo")
    assert [s.name for s in run.stages()] == ["joint"] and run.stage_dir(0).name == "stage-1-joint"
    inner = run.inner_config(0)
    out = run.stage_dir(0)
    assert (inner.data.train, inner.data.eval, inner.data.domains) == (str(out / "train.jsonl"),
                                                                       str(out / "eval.jsonl"), ())
    assert inner.schedule == "offline" and inner.train.max_steps == 6 and inner.model.name == str(tiny_model_dir)
    interleaved = [p for pair in zip(builtin["a"]["train"], builtin["b"]["train"]) for p in pair]
    assert _prompts(_rows(out / "train.jsonl")) == interleaved
    held = [p for pair in zip(builtin["a"]["held"], builtin["b"]["held"]) for p in pair]
    assert _prompts(_rows(out / "eval.jsonl")) == held


def test_the_driver_scores_the_held_out_split_against_a_frozen_base_with_the_runs_settings(tiny_model_dir, builtin,
                                                                                            tmp_path, monkeypatch):
    (sources.BUILTIN_ROOT / "b" / "held.jsonl").open("a").write("{not json\n")  # skipped under data.on_error: skip
    run = _run(tiny_model_dir, tmp_path / "run", "data.max_eval_pairs=5", "data.on_error=skip",
               "model.attn_implementation=eager", "scorer.chunk_size=3", "scorer.pack_tokens=77")
    base = run.base()
    assert base is run.base() and not any(p.requires_grad for p in base.parameters()) and not base.training
    assert base.config._attn_implementation == "eager"
    seen = []
    real_scorer, real_score_pairs = cofs.SequenceScorer, cofs.score_pairs

    def scorer(model, chunk_size):
        seen.append(("chunk_size", chunk_size))
        return real_scorer(model, chunk_size)

    def score_pairs(scorer, pairs, batch_size, pad_id, device, layout, pack_tokens):
        seen.append(("pack_tokens", pack_tokens))
        return real_score_pairs(scorer, pairs, batch_size, pad_id, device, layout, pack_tokens)

    monkeypatch.setattr(cofs, "SequenceScorer", scorer)
    monkeypatch.setattr(cofs, "score_pairs", score_pairs)
    result = run.evaluate_domains(base)
    assert set(seen) == {("chunk_size", 3), ("pack_tokens", 77)}
    for name in "ab":  # the first data.max_eval_pairs of the held-out split (b's bad row skipped)
        held = load_pairs(f"builtin:{name}", "held", run.pair_tokenizer)[0] if name == "a" else \
            load_pairs(f"builtin:{name}", "held", run.pair_tokenizer, "skip")[0]
        assert run._eval_pairs[name] == held[:5]
        assert result[name]["score"] == result[name]["preference"]["rewards/accuracies"]


def test_a_domain_with_a_task_is_scored_by_its_gold_reward_sampled_in_eval_mode(tiny_model_dir, builtin, tmp_path,
                                                                                 monkeypatch):
    """A domain with a task is scored by the gold reward of the model's samples against the frozen base, through one
    evaluator per domain made with the run's eval settings and the domain's task; one without by accuracy."""
    import copy

    calls = []

    class Evaluator:  # records how the driver builds and calls it; its gold reward is the call's number
        def __init__(self, tokenizer, cfg):
            calls.append(("made", tokenizer, cfg.task, cfg.num_prompts))

        def evaluate(self, policy, reference):
            with reference() as ref:
                calls.append(("evaluated", policy, policy.training, ref))
            return {"gold/reward": 0.25 * len(calls)}

    monkeypatch.setattr(cofs, "GenerationEvaluator", Evaluator)
    domains = ("data.domains=[{name: a, train: 'builtin:a', eval: 'builtin:a', eval_split: held, task: concision}, "
               "{name: b, train: 'builtin:b', eval: 'builtin:b', eval_split: held}]")
    run = _run(tiny_model_dir, tmp_path / "run", domains, "eval.num_prompts=3")
    model = copy.deepcopy(run.base()).train()
    first, second = run.evaluate_domains(model), run.evaluate_domains(model)
    assert calls == [("made", run.tokenizer, "concision", 3), ("evaluated", model, False, run.base()),
                     ("evaluated", model, False, run.base())]  # one evaluator, reused
    assert model.training  # the mode is restored
    assert (first["a"]["score"], second["a"]["score"]) == (0.5, 0.75)
    assert first["a"]["generation"] == {"gold/reward": 0.5}
    assert "generation" not in first["b"] and first["b"]["score"] == first["b"]["preference"]["rewards/accuracies"]


def test_the_domains_pairs_are_tokenized_with_the_data_settings(tiny_model_dir, builtin, tmp_path):
    run = _run(tiny_model_dir, tmp_path / "run", "data.max_length=40", "data.max_prompt_length=7",
               "data.prompt_truncation=right")
    tok = run.pair_tokenizer
    assert (tok.max_length, tok.max_prompt_length, tok.prompt_truncation) == (40, 7, "right")


@pytest.mark.parametrize("arm,schedule", [("cofs", "ofs"), ("sequential_ofs", "ofs"), ("sequential_dpo", "offline"),
                                          ("joint_dpo", "offline")])
def test_each_arm_trains_its_stages_with_its_schedule(tiny_model_dir, builtin, tmp_path, arm, schedule):
    assert _run(tiny_model_dir, tmp_path / "run", f"cofs.arm={arm}").inner_config(0).schedule == schedule
