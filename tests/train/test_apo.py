"""The APO schedule end to end on a tiny model: α = 0 is iterative DPO, the extrapolated model is the spec's
combination of dense weights (adapters merged), and an interrupted run skips finished iterations."""

import json

import pytest
import torch
from safetensors.torch import load_file

from preflab.config import ConfigError, load_config
from preflab.models.loader import load_model
from preflab.train import TrainingRun, train


def _cfg(model, out, *extra):
    return load_config(None, [
        "schedule=apo", f"model.name={model}", f"output_dir={out}", "data.eval=null", "eval.task=null",
        "train.progress=false", "diag.enabled=false", "parametrization.kind=full", "apo.task=concision",
        "apo.iterations=2", "apo.prompts_per_iteration=8", "apo.k=4", "apo.max_new_tokens=12", "apo.batch_prompts=8",
        "train.batch_size=4", "train.max_steps=2", "train.lr=1e-2", "train.warmup_ratio=0", *extra])


def _weights(path) -> dict:
    return {k: v for k, v in load_model(str(path)).state_dict().items()}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_alpha_zero_is_iterative_dpo(tiny_model_dir, tmp_path):
    result = train(_cfg(tiny_model_dir, tmp_path / "apo", "apo.alpha=0"))
    it1, it2 = tmp_path / "apo" / "iter-1", tmp_path / "apo" / "iter-2"
    assert result.steps == 4 and not (it1 / "extrapolated").exists()
    # iteration 2 starts from and references iteration 1's DPO output itself
    inner = load_config(it2 / "train" / "config.yaml")
    assert inner.model.name == str(it1 / "policy") and inner.schedule == "offline"
    # the same offline DPO run, launched by hand on iteration 2's pairs, gives the very same model
    by_hand = load_config(None, [f"model.name={it1 / 'policy'}", f"data.train={it2 / 'pairs' / 'train.jsonl'}",
                                 f"output_dir={tmp_path / 'by-hand'}", "data.eval=null", "train.progress=false",
                                 "diag.enabled=false", "parametrization.kind=full", "train.batch_size=4",
                                 "train.max_steps=2", "train.lr=1e-2", "train.warmup_ratio=0"])
    train(by_hand)
    assert _equal(_weights(tmp_path / "by-hand" / "final"), _weights(it2 / "policy"))
    assert _equal(_weights(tmp_path / "apo" / "final"), _weights(it2 / "policy"))
    records = [json.loads(line) for line in (tmp_path / "apo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["apo/iteration"] for r in records] == [1, 2] and [r["step"] for r in records] == [2, 4]
    assert all(r["apo/pairs_kept"] > 0 and r["apo/extrap_norm"] == 0 for r in records)


def test_lora_extrapolates_merged_weights(tiny_model_dir, tmp_path):
    out = tmp_path / "apo"
    train(_cfg(tiny_model_dir, out, "apo.alpha=0.3", "parametrization.kind=lora", "parametrization.r=4",
               "eval.task=concision", "eval.num_prompts=4", "eval.max_new_tokens=8", "apo.beta=[0.2, 0.5]"))
    base, hat1 = _weights(tiny_model_dir), _weights(out / "iter-1" / "policy")
    theta1 = _weights(out / "iter-1" / "extrapolated")
    moved = [k for k in base if not torch.equal(base[k], hat1[k])]
    assert moved and all("proj" in k for k in moved)  # LoRA moved the (merged) linear weights only
    for k in base:
        torch.testing.assert_close(theta1[k], 1.3 * hat1[k] - 0.3 * base[k], rtol=0, atol=1e-6)
    assert load_config(out / "iter-2" / "train" / "config.yaml").model.name == str(out / "iter-1" / "extrapolated")
    assert not (out / "iter-2" / "extrapolated").exists()  # nothing extrapolated after the last iteration
    assert _equal(_weights(out / "final"), _weights(out / "iter-2" / "policy"))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["apo/beta"] for r in records] == [0.2, 0.5]
    assert records[0]["apo/extrap_norm"] > 0 and records[1]["apo/extrap_norm"] == 0
    assert all("gold/reward" in r and "gold/win_rate" in r for r in records)
    assert json.loads((out / "iter-2" / "eval.json").read_text())["policy"]["task"] == "concision"
    card = (out / "final" / "README.md").read_text()  # final/'s card describes the APO run, not its last inner run
    assert "schedule: `apo`, 4 steps" in card and "library_name: transformers" in card
    assert "- APO: 2 iterations (sample, score, pair, train) of the `offline` schedule, Nesterov alpha 0.3; " \
           "`final/` is iteration 2's policy model" in card
    gold = json.loads((out / "iter-2" / "eval.json").read_text())["policy"]["gold/reward"]
    assert "## Generations: task `concision` (4 held-out prompts)" in card and f"| {gold:.4f} |" in card


def test_three_iterations_follow_the_spec_coefficients(tiny_model_dir, tmp_path):
    """With T+1 = 3 iterations the extrapolation of t = 1 runs: θ_2 = θ̂_2 + α(θ̂_2 − θ̂_1), anchored on the previous
    DPO output θ̂_1, not on the previous extrapolated model θ_1 (the spec's A2: 3.6, not 3.51). In the deltas
    D_j = θ̂_j − θ_{j−1} of each iteration's training: θ_1 = θ_0 + 1.3·D_1, θ_2 = θ_0 + 1.39·D_1 + 1.3·D_2 and the
    returned θ̂_3 = θ_0 + 1.39·D_1 + 1.3·D_2 + D_3 (spec §3, α = 0.3)."""
    out = tmp_path / "apo"
    train(_cfg(tiny_model_dir, out, "apo.iterations=3", "apo.alpha=0.3"))
    theta0 = _weights(tiny_model_dir)
    hat = [theta0] + [_weights(out / f"iter-{t}" / "policy") for t in (1, 2, 3)]  # θ̂_0 = θ_0, θ̂_1..θ̂_3
    theta = [theta0] + [_weights(out / f"iter-{t}" / "extrapolated") for t in (1, 2)]  # θ_0, θ_1, θ_2
    assert not (out / "iter-3" / "extrapolated").exists()
    for t in (1, 2):  # iteration t+1 starts from and references θ_t
        assert load_config(out / f"iter-{t + 1}" / "train" / "config.yaml").model.name == str(
            out / f"iter-{t}" / "extrapolated")
    deltas = [None] + [{k: hat[j][k] - theta[j - 1][k] for k in theta0} for j in (1, 2, 3)]  # D_1..D_3
    moved = 0.0
    for k in theta0:
        close = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
        close(theta[1][k], 1.3 * hat[1][k] - 0.3 * hat[0][k])
        close(theta[2][k], 1.3 * hat[2][k] - 0.3 * hat[1][k])
        close(theta[1][k], theta0[k] + 1.3 * deltas[1][k])
        close(theta[2][k], theta0[k] + 1.39 * deltas[1][k] + 1.3 * deltas[2][k])
        close(hat[3][k], theta0[k] + 1.39 * deltas[1][k] + 1.3 * deltas[2][k] + deltas[3][k])
        # anchoring on θ_1 instead would differ by 0.3·(θ_1 − θ̂_1) = 0.09·D_1
        moved = max(moved, (0.3 * (theta[1][k] - hat[1][k])).abs().max().item())
    assert moved > 1e-3  # large enough that the wrong anchor would fail the checks above
    assert _equal(_weights(out / "final"), hat[3])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["apo/iteration"] for r in records] == [1, 2, 3]
    assert records[1]["apo/extrap_norm"] > 0 and records[2]["apo/extrap_norm"] == 0


def test_interrupted_run_skips_finished_iterations(tiny_model_dir, tmp_path, monkeypatch):
    extra = ("apo.alpha=0.3", "train.save_steps=1")
    train(_cfg(tiny_model_dir, tmp_path / "straight", *extra))

    original, inits = TrainingRun.optimizer_step, []

    def killed_in_iteration_2(self):
        if "iter-2" in str(self.run_dir) and self.state["step"] == 1:
            raise KeyboardInterrupt("simulated kill")
        return original(self)

    monkeypatch.setattr(TrainingRun, "optimizer_step", killed_in_iteration_2)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_model_dir, tmp_path / "resumed", *extra))
    monkeypatch.setattr(TrainingRun, "optimizer_step", original)
    done_before = (tmp_path / "resumed" / "iter-1" / "done.json").read_text()
    original_init = TrainingRun.__init__

    def counted_init(self, config):
        inits.append(config.output_dir)
        original_init(self, config)

    monkeypatch.setattr(TrainingRun, "__init__", counted_init)
    train(_cfg(tiny_model_dir, tmp_path / "resumed", *extra, "train.save_total_limit=7"))  # a changed setting
    assert inits == [str(tmp_path / "resumed" / "iter-2" / "train")]  # iteration 1 was not redone
    kept = tmp_path / "resumed" / "config.before-iter-2.yaml"  # the config the run started with, named by iteration
    assert "save_total_limit: 7" not in kept.read_text()
    assert "save_total_limit: 7" in (tmp_path / "resumed" / "config.yaml").read_text()
    assert not list((tmp_path / "straight").glob("config.before-*"))
    assert (tmp_path / "resumed" / "iter-1" / "done.json").read_text() == done_before
    assert _equal(_weights(tmp_path / "straight" / "final"), _weights(tmp_path / "resumed" / "final"))
    ckpt = max((tmp_path / "resumed" / "iter-2" / "train" / "checkpoints").iterdir())
    straight = max((tmp_path / "straight" / "iter-2" / "train" / "checkpoints").iterdir())
    a, b = load_file(ckpt / "trainable.safetensors"), load_file(straight / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_few_prompts_for_disjoint_slices_is_a_config_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="prompts_per_iteration"):
        train(_cfg(tiny_model_dir, tmp_path / "r", "apo.prompts_per_iteration=100000"))


def test_apo_beta_sets_every_beta_of_the_objective_or_is_refused(tiny_model_dir, tmp_path):
    from preflab.train.apo import ApoRun

    run = ApoRun(_cfg(tiny_model_dir, tmp_path / "a", "loss.name=flex", "loss.beta_chosen=0.1",
                      "loss.beta_rejected=0.08", "apo.beta=[0.5, 1.0]"))
    flex = [run.inner_config(t, tmp_path / "pairs.jsonl").loss[0].params for t in (0, 1)]
    assert [(f.beta_chosen, f.beta_rejected) for f in flex] == [(0.5, pytest.approx(0.4)), (1.0, pytest.approx(0.8))]
    mixed = ApoRun(_cfg(tiny_model_dir, tmp_path / "b", "loss=[{name: sigmoid}, {name: sft, weight: 0.1}]",
                        "apo.beta=0.3")).inner_config(0, tmp_path / "pairs.jsonl").loss
    sft = load_config(None, ["loss=[{name: sft, weight: 0.1}]"]).loss[0].params
    assert mixed[0].params.beta == 0.3 and mixed[1].params == sft
    with pytest.raises(ConfigError, match=r"apo.beta: no term of the objective \(sft\) has a beta"):
        ApoRun(_cfg(tiny_model_dir, tmp_path / "c", "loss.name=sft", "apo.beta=0.2"))


def test_apo_over_ofs_extrapolates_the_exported_module(tiny_model_dir, tmp_path):
    """``apo.inner: ofs``: each iteration is an OFS-DPO run (two LoRA modules); its policy θ̂ is the exported leader
    folded into the weights, and the extrapolation and the next iteration start from it as from a DPO output."""
    out = tmp_path / "apo"
    train(_cfg(tiny_model_dir, out, "apo.alpha=0.3", "apo.inner=ofs", "parametrization={kind: lora, r: 4}",
               "ofs.swap_interval=1", "ofs.alpha=0.5"))
    inner = load_config(out / "iter-1" / "train" / "config.yaml")
    assert inner.schedule == "ofs" and inner.ofs.alpha == 0.5
    records = [json.loads(line) for line in (out / "iter-1" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert "ofs/gap" in records[-1]
    base, hat1 = _weights(tiny_model_dir), _weights(out / "iter-1" / "policy")
    theta1 = _weights(out / "iter-1" / "extrapolated")
    assert any(not torch.equal(base[k], hat1[k]) for k in base)
    for k in base:
        torch.testing.assert_close(theta1[k], 1.3 * hat1[k] - 0.3 * base[k], rtol=0, atol=1e-6)
    assert load_config(out / "iter-2" / "train" / "config.yaml").model.name == str(out / "iter-1" / "extrapolated")
    with pytest.raises(ConfigError, match="ofs.fused_forward: both modules in one routed forward"):
        train(_cfg(tiny_model_dir, tmp_path / "refused", "apo.inner=ofs", "ofs.fused_forward=true"))
