"""The multi-domain schedule (``schedule: cofs``) on a tiny model: COFS-DPO's stages, weight choice and exact
combination, its baselines, the forgetting matrix, resume (OFS's ``export: best_val_fast``, COFS's choice of a
domain's module, is tested with the OFS schedule)."""

import copy
import json

import pytest
import torch
from conftest import sentiment_rows, train_until_killed, write_jsonl
from torch.testing import assert_close

from preflab.config import ConfigError, load_config
from preflab.data.collate import collate_pairs
from preflab.data.dataset import load_pairs
from preflab.data.tokenize import PairTokenizer
from preflab.models.loader import load_model
from preflab.models.scorer import SequenceScorer
from preflab.train import TrainingRun, cofs_combine, train
from preflab.train.cofs import DomainsRun, forgetting_summary, format_matrix


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("domains")
    a = write_jsonl(root / "a.jsonl", sentiment_rows(16))
    # domain b prefers what a rejects: the two pull apart, so the combination has something to weigh
    b = write_jsonl(root / "b.jsonl", [{**r, "chosen": r["rejected"], "rejected": r["chosen"]}
                                       for r in sentiment_rows(16, 100)])
    return f"data.domains=[{{name: a, train: {a}, eval: {a}}}, {{name: b, train: {b}, eval: {b}}}]"


def _config(model_dir, domains, out, *extra):
    return load_config(None, [f"model.name={model_dir}", f"output_dir={out}", "schedule=cofs", domains,
                              "train.progress=false", "train.warmup_ratio=0", "diag.enabled=false",
                              "train.batch_size=4", "train.lr=5e-3", "parametrization.kind=lora",
                              "parametrization.r=4", "parametrization.dropout=0", "train.max_steps=4",
                              "train.eval_steps=2", "cofs.buffer_size=8", "cofs.grid_step=0.25", *extra])


def _logps(model, tokenizer, path):
    pairs = load_pairs(str(path), "train", PairTokenizer(tokenizer))[0][:6]
    batch = collate_pairs(pairs, tokenizer.pad_token_id, "shared")
    with torch.no_grad():
        return SequenceScorer(model.eval())(**batch.scorer_inputs())[0]


def _json(path):
    return json.loads(path.read_text())


def test_cofs_combines_the_stored_modules_exactly_and_scores_every_domain(tiny_model_dir, domains, tmp_path,
                                                                         tokenizer):
    from peft import PeftModel

    out = tmp_path / "runs" / "cofs"  # its parent made too
    result = train(_config(tiny_model_dir, domains, out))
    s1, s2 = out / "stage-1-a", out / "stage-2-b"
    base = load_model(str(tiny_model_dir))
    buffer = s1 / "buffer.jsonl"
    assert len(buffer.read_text().splitlines()) == 8
    # stage 1: D = 1, the combination is the domain's selected module itself
    stage1 = load_model(str(s1 / "model"))
    module1 = PeftModel.from_pretrained(copy.deepcopy(base), s1 / "train" / "final")
    assert_close(_logps(stage1, tokenizer, buffer), _logps(module1, tokenizer, buffer), atol=0, rtol=1e-5)
    # stage 2 trained on top of the folded stage-1 combination (its reference)
    assert load_config(s2 / "train" / "config.yaml").model.name == str(s1 / "model")
    combine = _json(s2 / "combine.json")
    assert combine["delta_coeffs"] == [[1.0, 0.0], [1.0, 1.0]]  # D_1 = φ1, D_2 = C_1 + φ2
    assert len(combine["tried"]) == 5 and combine["buffer_pairs"] == 16
    best = min(combine["tried"], key=lambda t: (t["objective"], -t["weights"][-1]))
    assert combine["weights"] == best["weights"]
    w = combine["weights"]
    assert combine["combined_coeffs"] == pytest.approx([w[0] + w[1], w[1]])
    # the stage-2 model is θ₀ + C_2, and the exported concatenated adapter is the same model
    stage2 = load_model(str(s2 / "model"))
    combined = PeftModel.from_pretrained(copy.deepcopy(base), s2 / "combined")
    assert_close(_logps(combined, tokenizer, buffer), _logps(stage2, tokenizer, buffer), atol=0, rtol=1e-5)
    # the forgetting matrix: every domain after every stage
    matrix = _json(out / "matrix.json")
    assert matrix["stages"] == ["a", "b"] and [sorted(r) for r in matrix["scores"]] == [["a", "b"]] * 2
    assert matrix["average_forgetting"] == pytest.approx(matrix["scores"][0]["a"] - matrix["scores"][1]["a"])
    assert matrix["average_final"] == pytest.approx(sum(matrix["scores"][1].values()) / 2)
    assert result.steps == 8 and "average forgetting" in result.table
    done = _json(s2 / "done.json")["cofs"]
    assert done["adapter_rank"] == 4 * sum(c != 0 for c in combine["combined_coeffs"])  # r = 4 per nonzero module
    assert _json(s2 / "combined" / "adapter_config.json")["base_model_name_or_path"] == str(tiny_model_dir)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["cofs/weights"] for r in records] == [[1.0], w]
    assert [(r["step"], r["cofs/stage"], r["cofs/domain"]) for r in records] == [(4, 1, "a"), (8, 2, "b")]
    assert records[1]["cofs/objective"] == combine["objective"]
    assert records[1]["cofs/score/a"] == matrix["scores"][1]["a"]
    stages = [_json(s / "done.json") for s in (s1, s2)]
    assert [(r["stage"], r["domain"], r["start"]) for r in stages] == [(1, "a", str(tiny_model_dir)),
                                                                      (2, "b", str(s1 / "model"))]
    assert _json(s2 / "eval.json")["a"]["score"] == matrix["scores"][1]["a"] and "eval" not in stages[1]
    assert matrix["arm"] == "cofs" and result.run_dir == out
    assert result.seconds == pytest.approx(sum(r["seconds"] for r in stages))
    assert not (s1 / "module").exists()  # LoRA modules are combined as adapters: no dense change stored
    assert (out / "final" / "config.json").is_file()
    card = (out / "final" / "README.md").read_text()  # final/'s card describes the whole run, not stage 2's
    assert "- continual alignment, `cofs.arm=cofs`: one stage per domain (a, b)" in card
    assert "schedule: `cofs`, 8 steps" in card and "library_name: transformers" in card
    assert "average forgetting" in card


def test_fresh_modules_replay_and_projected_gradients(tiny_model_dir, domains, tmp_path):
    out = tmp_path / "fresh"
    train(_config(tiny_model_dir, domains, out, "cofs.init=fresh", "cofs.select=final_fast",
                  "cofs.grid_max_domains=1", "cofs.pgd_steps=3", "cofs.pgd_lr=0.5", "cofs.pgd_optimizer=sgd",
                  "cofs.replay_in_training=true"))
    assert len((out / "stage-2-b" / "train.jsonl").read_text().splitlines()) == 16 + 8  # b, then a's buffer
    assert load_config(out / "stage-2-b" / "train" / "config.yaml").model.name == str(tiny_model_dir)
    combine = _json(out / "stage-2-b" / "combine.json")
    assert combine["delta_coeffs"] == [[1.0, 0.0], [0.0, 1.0]] and combine["combined_coeffs"] == combine["weights"]
    tried = combine["tried"]
    assert len(tried) == 4 and tried[0]["weights"] == [0.5, 0.5]  # uniform start, then 3 projected steps
    assert all(min(t["weights"]) >= 0 and sum(t["weights"]) == pytest.approx(1) for t in tried)
    assert tried[1]["weights"] != tried[0]["weights"] and combine["objective"] == min(t["objective"] for t in tried)


@pytest.mark.parametrize("arm", ["sequential_dpo", "joint_dpo"])
def test_the_baselines_are_one_key_away(tiny_model_dir, domains, tmp_path, arm):
    out = tmp_path / arm
    result = train(_config(tiny_model_dir, domains, out, f"cofs.arm={arm}"))
    matrix = _json(out / "matrix.json")
    if arm == "joint_dpo":  # one run on both domains, as many steps as the sequence
        assert matrix["stages"] == ["joint"] and result.steps == 8 and "average_forgetting" not in matrix
        rows = (out / "stage-1-joint" / "train.jsonl").read_text().splitlines()
        assert len(rows) == 32 and "item number 0." in rows[0] and "item number 100." in rows[1]  # interleaved
        assert not (out / "stage-1-joint" / "buffer.jsonl").exists()  # nothing to replay or combine
    else:
        assert matrix["stages"] == ["a", "b"] and result.steps == 8
        assert load_config(out / "stage-2-b" / "train" / "config.yaml").model.name == str(out / "stage-1-a" / "model")
        assert not (out / "stage-2-b" / "combine.json").exists()


def test_a_killed_run_resumes_to_the_same_matrix(tiny_model_dir, domains, tmp_path, monkeypatch):
    whole = train(_config(tiny_model_dir, domains, tmp_path / "whole"))
    config = _config(tiny_model_dir, domains, tmp_path / "killed", "train.save_steps=1")
    train_until_killed(config, 2, monkeypatch)  # in stage 1, after its checkpoint of step 2
    assert not (tmp_path / "killed" / "stage-1-a" / "done.json").exists()
    train(config)
    assert _json(tmp_path / "killed" / "matrix.json")["scores"] == _json(tmp_path / "whole" / "matrix.json")["scores"]
    assert whole.steps == 8

    def no_training(self):
        raise AssertionError("a finished stage trained again")

    monkeypatch.setattr(TrainingRun, "run", no_training)
    again = train(config)  # every stage done: nothing runs, the summary is rebuilt
    assert again.steps == 8


def test_cofs_refusals_and_the_forgetting_summary(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.domains: schedule: cofs needs the ordered domains, e\.g\. "
                                          r"data\.domains=\[sentiment, format, concision\]$"):
        DomainsRun(load_config(None, [f"model.name={tiny_model_dir}", "schedule=cofs"]))
    with pytest.raises(ConfigError, match="names must differ"):
        load_config(None, ["data.domains=[sentiment, sentiment]"])
    with pytest.raises(ConfigError, match="grid_step"):
        load_config(None, ["cofs.grid_step=0.3"])
    with pytest.raises(ConfigError, match=r"held-out pairs \(eval\) to be scored; \['x'\] have none$"):
        DomainsRun(load_config(None, [f"model.name={tiny_model_dir}", "schedule=cofs",
                                      "data.domains=[{name: x, train: x.jsonl}]"]))
    scores = [{"a": 0.9, "b": 0.95, "c": 0.2}, {"a": 0.6, "b": 0.8, "c": 0.3}, {"a": 0.7, "b": 0.5, "c": 0.9}]
    summary = forgetting_summary(["a", "b", "c"], scores)
    # a: best 0.9 → 0.7; b: best since its own stage 0.8 → 0.5 (its 0.95 before it was trained does not count)
    assert summary["forgetting"] == pytest.approx({"a": 0.2, "b": 0.3})
    assert summary["average_forgetting"] == pytest.approx(0.25)
    assert summary["average_final"] == pytest.approx(0.7)
    assert forgetting_summary(["a"], [{"a": 0.5}]) == {"average_final": 0.5}  # one domain: nothing to forget
    assert format_matrix({"domains": ["a", "b"], "stages": ["a", "b"], "scores": scores[:2], **summary}) == (
        "after stage               a             b\n"
        "a                    0.9000        0.9500\n"
        "b                    0.6000        0.8000\n"
        "average final score 0.7000\n"
        "average forgetting 0.2500")


def test_cofs_combines_modules_of_any_parametrization_through_their_dense_changes(tiny_model_dir, domains, tmp_path):
    """RoPO modules: each domain's module is stored as ΔW = W' − W of its merged model against the model it started
    from; the stage-2 model is θ₀ + Σ_j c_j ΔW_j for the chosen combination (exact), with no adapter to export."""
    from preflab.ofs.dense import fold_dense, read_delta

    out = tmp_path / "cofs-ropo"
    train(_config(tiny_model_dir, domains, out, "parametrization={kind: ropo, target_modules: [all-linear], "
                                                 "factors: [[2, 1], [2, 2]]}", "train.lr=2e-2"))
    s1, s2 = out / "stage-1-a", out / "stage-2-b"
    deltas = [read_delta(s / "module") for s in (s1, s2)]
    assert deltas[0] and set(deltas[0]) == set(deltas[1])
    combine = _json(s2 / "combine.json")
    assert combine["delta_coeffs"] == [[1.0, 0.0], [1.0, 1.0]] and len(combine["tried"]) == 5
    assert not (s2 / "combined").exists()
    rebuilt = load_model(str(tiny_model_dir))
    fold_dense(rebuilt, deltas, combine["combined_coeffs"])
    stage2 = dict(load_model(str(s2 / "model")).named_parameters())
    for name, param in rebuilt.named_parameters():
        assert_close(stage2[name], param, rtol=0, atol=1e-6)
    # stage 2's module is its change against its start, the stage-1 model
    start, final = load_model(str(s1 / "model")), load_model(str(s2 / "train" / "final"))
    before = dict(start.named_parameters())
    for name, param in final.named_parameters():
        if name in deltas[1]:
            assert_close(param - before[name], deltas[1][name], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="cofs.combine=factors combines LoRA factors"):
        train(_config(tiny_model_dir, domains, tmp_path / "refused", "parametrization={kind: full}",
                      "cofs.combine=factors"))


def _stored(run, out):
    """The two stages' LoRA modules and the union of their replay buffers, as the weight search reads them."""
    from preflab.ofs.combine import read_lora_adapter

    modules = [read_lora_adapter(out / f"stage-{j + 1}-{n}" / "train" / "final") for j, n in enumerate("ab")]
    pairs = [p for n in ("1-a", "2-b") for p in run.load(str(out / f"stage-{n}" / "buffer.jsonl"), "train")]
    return modules, pairs


def _folded_metrics(run, base, modules, pairs, reference, w) -> dict:
    """Held-out preference metrics of θ₀ + Σ w_k ΔW_k, folded into a copy of ``base``, by the evaluation's scorer."""
    from preflab.eval.preference import preference_metrics
    from preflab.ofs.combine import fold_into

    model = copy.deepcopy(base)
    fold_into(model, modules, list(w))
    return preference_metrics(run.objective, run.score(model, pairs), reference)


def test_the_projected_gradient_search_scores_and_steps_by_the_objective_of_the_combination(tiny_model_dir, domains,
                                                                                            tmp_path):
    """Each candidate's objective is the DPO loss of θ₀ + C(w) on the two buffers (reference θ₀), recomputed here
    through folded weights and the evaluation's own scorer (batches of 3: a last partial one); one SGD step from
    (½, ½) with lr η moves w₁ by −η/2 · (g₁ − g₂)/2 after the projection, and g₁ − g₂ = dL/dt at (½ + t, ½ − t),
    here by central differences. The same search by preference accuracy scores each candidate by it."""
    out = tmp_path / "pgd"
    extra = ("cofs.init=fresh", "cofs.select=final_fast", "cofs.grid_max_domains=1", "cofs.pgd_steps=2",
             "cofs.pgd_lr=0.5", "cofs.pgd_optimizer=sgd", "train.eval_batch_size=3")
    train(_config(tiny_model_dir, domains, out, *extra))
    tried = _json(out / "stage-2-b" / "combine.json")["tried"]
    run = DomainsRun(_config(tiny_model_dir, domains, out, *extra))
    modules, pairs = _stored(run, out)
    base = load_model(str(tiny_model_dir))
    reference = run.score(base, pairs)

    def metrics(w):
        return _folded_metrics(run, base, modules, pairs, reference, w)

    assert len(pairs) == 16 and [t["weights"] for t in tried][0] == [0.5, 0.5]
    for t in tried:
        assert t["objective"] == pytest.approx(metrics(t["weights"])["loss"], rel=1e-5)
    eps = 1e-3
    slope = (metrics([0.5 + eps, 0.5 - eps])["loss"] - metrics([0.5 - eps, 0.5 + eps])["loss"]) / (2 * eps)
    assert abs(slope) > 1e-3 and 0 < tried[1]["weights"][0] < 1
    assert tried[1]["weights"][0] == pytest.approx(0.5 - 0.5 * slope / 2, abs=2e-3)

    by_accuracy = DomainsRun(_config(tiny_model_dir, domains, out, *extra, "cofs.select_metric=pref_acc"))
    deltas = [[1.0, 0.0], [0.0, 1.0]]
    choice = by_accuracy.combination.choose_weights(modules, deltas, 1)
    for t in choice["tried"]:
        assert t["objective"] == pytest.approx(metrics(t["weights"])["rewards/accuracies"], abs=1e-6)
    assert choice["objective"] == max(t["objective"] for t in choice["tried"])
    # modules that change nothing: every pair's margin is 0, a tie, which is not a correct pair (as in evaluation)
    unchanged = by_accuracy.combination.choose_weights(modules, [[0.0, 0.0], [0.0, 0.0]], 1)
    assert {t["objective"] for t in unchanged["tried"]} == {0.0}


def test_the_grid_search_the_buffers_and_the_coefficients_of_a_stage(tiny_model_dir, domains, tmp_path, monkeypatch):
    """After a two-domain run: the grid's candidates scored by the loss or the accuracy of the folded combination,
    Adam's first projected step, one module's trivial choice, the combination of a third domain's delta, the
    buffers (kept once written, seeded), ``cofs.combine=dense`` on LoRA, and the joint arm's interleaving."""
    from preflab.train.cofs import _interleave, _rows

    out = tmp_path / "grid"
    extra = ("cofs.init=fresh", "cofs.select=final_fast", "cofs.grid_max_domains=2", "train.max_steps=2")
    train(_config(tiny_model_dir, domains, out, *extra))
    base = load_model(str(tiny_model_dir))
    deltas = [[1.0, 0.0], [0.0, 1.0]]
    adam = DomainsRun(_config(tiny_model_dir, domains, out, *extra, "cofs.grid_max_domains=1", "cofs.pgd_steps=1",
                              "cofs.pgd_lr=0.5"))
    modules, pairs = _stored(adam, out)
    reference = adam.score(base, pairs)
    for metric, key in (("dpo_loss", "loss"), ("pref_acc", "rewards/accuracies")):
        run = DomainsRun(_config(tiny_model_dir, domains, out, *extra, f"cofs.select_metric={metric}"))
        choice = run.combination.choose_weights(modules, deltas, 1)
        assert len(choice["tried"]) == 5  # the grid of step ¼ (n = grid_max_domains)
        values = []
        for t in choice["tried"]:
            values.append(_folded_metrics(run, base, modules, pairs, reference, t["weights"])[key])
            assert t["objective"] == pytest.approx(values[-1], rel=1e-5, abs=1e-7)
        best = max(values) if metric == "pref_acc" else min(values)  # recomputed: equal up to float summation order
        assert choice["objective"] == pytest.approx(best, rel=1e-5, abs=1e-7)
    # the projected-gradient search under a length-normalized objective (it reads the token counts), scored with
    # the run's scorer settings
    seen = []
    real_scorer, real_collate = cofs_combine.SequenceScorer, cofs_combine.collate_pairs
    monkeypatch.setattr(cofs_combine, "SequenceScorer", lambda m, chunk: seen.append(chunk) or real_scorer(m, chunk))
    monkeypatch.setattr(cofs_combine, "collate_pairs",
                        lambda p, pad, layout, pack: seen.append(pack) or real_collate(p, pad, layout, pack))
    run = DomainsRun(_config(tiny_model_dir, domains, out, *extra, "loss={name: sigmoid, logp_normalize: mean}",
                             "scorer.chunk_size=5", "scorer.pack_tokens=99", "cofs.grid_max_domains=1",
                             "cofs.pgd_steps=1"))
    for t in run.combination.choose_weights(modules, deltas, 1)["tried"]:
        expected = _folded_metrics(run, base, modules, pairs, reference, t["weights"])["loss"]
        assert t["objective"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert set(seen) == {5, 99}
    monkeypatch.undo()

    tried = adam.combination.choose_weights(modules, deltas, 1)["tried"]
    # Adam's first step moves each coordinate by ∓lr whatever its gradient's size (less its ε): (0, 1), (1, 0) or,
    # both signs alike, back to (½, ½) after the projection
    assert any(tried[1]["weights"] == pytest.approx(w, abs=1e-4) for w in ([0, 1], [1, 0], [0.5, 0.5]))

    c = adam.combination
    assert c.choose_weights(modules[:1], [[1.0]], 0) == {"weights": [1.0], "objective": None, "tried": []}
    previous = [{"cofs": {"combined_coeffs": [1.0]}}, {"cofs": {"combined_coeffs": [0.3, 0.7]}}]
    assert c.delta_coeffs(2, previous) == [0.0, 0.0, 1.0]  # fresh: D_3 = φ3
    on_top = DomainsRun(_config(tiny_model_dir, domains, out, "cofs.init=from_combined")).combination
    assert on_top.delta_coeffs(2, previous) == [0.3, 0.7, 1.0]  # from the combination: D_3 = C_2 + φ3
    assert not c.dense
    s2 = out / "stage-2-b"
    (s2 / "combined" / "stale.bin").write_bytes(b"from an earlier try")
    loads = []

    def spy(name, dtype, attn_implementation):
        loads.append(attn_implementation)
        return load_model(name, dtype, attn_implementation)

    monkeypatch.setattr(cofs_combine, "load_model", spy)
    eager = DomainsRun(_config(tiny_model_dir, domains, out, *extra, "model.attn_implementation=eager"))
    model, record = eager.combination.combine(1, [_json(out / "stage-1-a" / "done.json")])
    assert loads == ["eager", "eager"] and model.config._attn_implementation == "eager"
    assert not (s2 / "combined" / "stale.bin").exists()  # the combination's adapter is written afresh
    assert _json(s2 / "combine.json")["combined_coeffs"] == record["combined_coeffs"]
    assert DomainsRun(_config(tiny_model_dir, domains, out, *extra, "cofs.combine=dense")).combination.dense

    buffer = out / "stage-1-a" / "buffer.jsonl"
    rows = buffer.read_text().splitlines()
    buffer.write_text(rows[0] + "\n")
    assert adam.write_buffer(0) == buffer and buffer.read_text() == rows[0] + "\n"  # a written buffer is kept
    buffer.unlink()
    adam.write_buffer(0)
    assert buffer.read_text().splitlines() == rows  # the same seeded sample again

    assert _interleave([[1, 2, 3], [4], [5, 6]]) == [1, 4, 5, 2, 6, 3]
    held_out = _rows("builtin:sentiment", "eval")
    assert held_out and held_out != _rows("builtin:sentiment", "train")
