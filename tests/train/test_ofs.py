"""The OFS-DPO schedule on a tiny model: the α = 0 reduction, role swaps at window boundaries, exact resume,
an exported leader that plain PEFT loads."""

import json
import shutil

import pytest
import torch
from conftest import sentiment_rows, train_until_killed, write_jsonl
from safetensors.torch import load_file

from preflab.config import ConfigError, load_config
from preflab.train import TrainingRun, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("ofs-data") / "pairs.jsonl", sentiment_rows(12))


def _config(model_dir, data, out, *extra):
    return load_config(None, [f"model.name={model_dir}", f"data.train={data}", f"output_dir={out}", "data.eval=null",
                              "schedule=ofs", "train.progress=false", "train.warmup_ratio=0", "diag.enabled=false",
                              "train.batch_size=4", "train.lr=5e-3", "parametrization.kind=lora",
                              "parametrization.r=4", "parametrization.dropout=0", *extra])


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _modules(run_dir):
    state = load_file(sorted((run_dir / "checkpoints").iterdir())[-1] / "trainable.safetensors")
    return ({k: v for k, v in state.items() if k.endswith(".fast")}, {k: v for k, v in state.items()
                                                                        if k.endswith(".slow")})


def test_without_chasing_and_at_equal_speed_the_modules_stay_identical(tiny_model_dir, data, tmp_path):
    train(_config(tiny_model_dir, data, tmp_path / "run", "train.max_steps=5", "ofs.alpha=0",
                  "ofs.slow_lr_ratio=1", "ofs.swap_interval=2"))
    fast, slow = _modules(tmp_path / "run")
    assert len(fast) == len(slow) > 0
    for name, value in fast.items():
        assert torch.equal(value, slow[name[:-len("fast")] + "slow"]), name
    records = _records(tmp_path / "run")
    assert all(r["ofs/loss_fast"] == r["ofs/loss_slow"] and r["ofs/gap"] == 0 for r in records)
    assert records[-1]["ofs/margin_fast"] > 0 and records[0]["loss"] == pytest.approx(0.6931, abs=1e-4)


def test_roles_follow_the_window_losses_and_the_leader_is_exported(tiny_model_dir, data, tmp_path, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from preflab.data.collate import collate_pairs
    from preflab.data.dataset import load_pairs
    from preflab.data.tokenize import PairTokenizer
    from preflab.models.scorer import SequenceScorer

    config = _config(tiny_model_dir, data, tmp_path / "run", "train.max_steps=9", "ofs.swap_interval=2",
                     "ofs.alpha=0.5", "ofs.slow_lr_ratio=3")  # the "slow" module learns faster: it takes the lead
    run = TrainingRun(config)
    run.run()
    records = _records(tmp_path / "run")
    leader = "fast"
    for r in records:  # recompute the rule from the logged window losses
        if r["step"] % 2 == 0:
            window = [x for x in records if r["step"] - 2 < x["step"] <= r["step"]]
            fast = sum(x["ofs/loss_fast"] for x in window)
            slow = sum(x["ofs/loss_slow"] for x in window)
            leader = "fast" if fast <= slow else "slow"
        assert r["ofs/leader"] == ("fast", "slow").index(leader), r["step"]
    assert records[-1]["ofs/swaps"] >= 1  # the lead did change hands in this run
    assert {"ofs/gap", "ofs/push", "ofs/margin_fast", "ofs/margin_slow", "ofs/grad_norm_fast",
            "ofs/swaps"} <= set(records[-1])
    exported = run.program.roles.leader  # after the final check on the partial window (step 9)
    pairs, _ = load_pairs(data, "train", PairTokenizer(tokenizer), limit=4)
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    with torch.no_grad(), run.param.pair.routed(exported) as model:
        want, _, _ = SequenceScorer(model)(**batch.scorer_inputs())
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                       tmp_path / "run" / "final").eval()
    with torch.no_grad():
        got, _, _ = SequenceScorer(loaded)(**batch.scorer_inputs())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_a_killed_run_resumes_to_the_same_modules_and_roles(tiny_model_dir, data, tmp_path, monkeypatch):
    """(with the fused forward: the other tests run the two-forward default)"""
    extra = ["train.max_steps=7", "train.save_steps=2", "ofs.swap_interval=3", "ofs.alpha=0.5",
             "ofs.fused_forward=true", "train.lr_scheduler=cosine"]
    train(_config(tiny_model_dir, data, tmp_path / "straight", *extra))
    train_until_killed(_config(tiny_model_dir, data, tmp_path / "killed", *extra), 5, monkeypatch)
    train(_config(tiny_model_dir, data, tmp_path / "killed", *extra))
    for a, b in zip(_modules(tmp_path / "straight"), _modules(tmp_path / "killed")):
        for name in a:
            assert torch.equal(a[name], b[name]), name
    straight, resumed = _records(tmp_path / "straight"), _records(tmp_path / "killed")
    assert [r["ofs/leader"] for r in straight] == [r["ofs/leader"] for r in resumed]
    assert [r["loss"] for r in straight] == [r["loss"] for r in resumed]


def test_ofs_refuses_what_it_cannot_run(tiny_model_dir, data, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="routed forward is the LoRA pair's; a pair of full runs one forward per"):
        TrainingRun(load_config(None, [f"model.name={tiny_model_dir}", f"data.train={data}", "schedule=ofs",
                                       f"output_dir={tmp_path / 'a'}", "parametrization.kind=full",
                                       "ofs.fused_forward=true"]))
    with pytest.raises(ConfigError, match="fused_forward=true"):
        TrainingRun(_config(tiny_model_dir, data, tmp_path / "b", "train.gradient_checkpointing=true"))
    monkeypatch.setenv("WORLD_SIZE", "2")  # checked before any process group is needed
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="ofs under FSDP needs ofs.fused_forward=true"):
        TrainingRun(_config(tiny_model_dir, data, tmp_path / "c"))


@pytest.mark.parametrize("fused", [False, True, "checkpointing"])
@pytest.mark.parametrize("leader", ["fast", "slow"])
@pytest.mark.parametrize("objective", ["sigmoid", "flex-mean", "sigmoid-ofs-beta", "sigmoid-gap-clamp"])
def test_the_training_step_gradient_is_the_spec_identity(tiny_model_dir, data, tmp_path, fused, leader, objective):
    """The gradient of one OFS step on each module equals that of Σ_i w_k,i·h_k,i with the spec's weights
    ∂loss/∂h_k = −[σ(−h_k) + α·σ(h_S − h_F)]/n (F the leader, S the chaser): both modules are pushed towards larger
    margins by the gap term. A flipped sign of the chasing term in the step (the modules fleeing each other) or the
    roles swapped inside it changes these weights. The margins h are the objective's own reward margins: β·h for
    DPO, β⁺ρ⁺ − β⁻ρ⁻ for Flex-DPO, per token under ``logp_normalize: mean``; with ``ofs.beta`` the chasing
    term's margins take that β while the DPO terms keep the objective's; a gap beyond ``ofs.gap_clamp`` pushes
    nothing. A fused forward's recomputation under gradient checkpointing routes its rows as the forward did."""
    from preflab.ofs.pair import MODULES

    alpha, (beta_c, beta_r) = 0.5, (0.4, 0.2) if objective == "flex-mean" else (0.1, 0.1)
    chase_beta = (0.3, 0.3) if objective == "sigmoid-ofs-beta" else (beta_c, beta_r)
    extra = {"sigmoid": [], "sigmoid-ofs-beta": ["ofs.beta=0.3"], "sigmoid-gap-clamp": ["ofs.gap_clamp=1e-6"],
             "flex-mean": ["loss.name=flex", "loss.beta_chosen=0.4", "loss.beta_rejected=0.2",
                           "loss.logp_normalize=mean"]}[objective]
    if fused == "checkpointing":
        extra += ["train.gradient_checkpointing=true"]
    run = TrainingRun(_config(tiny_model_dir, data, tmp_path / "run", f"ofs.alpha={alpha}",
                              f"ofs.fused_forward={bool(fused)}", *extra))
    pair = run.param.pair
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the modules off the reference, apart from each other: margins and gap ≠ 0
        for layer in pair.layers.values():
            for m, std in (("fast", 0.3), ("slow", 0.1)):
                layer.lora_B[m].copy_(torch.randn(layer.lora_B[m].shape, generator=generator) * std)
    run.program.roles.leader = leader
    indices = [0, 1, 2, 3]
    run.micro_step(indices, len(indices), sync=True, scale=1.0)
    got = {m: [p.grad.clone() for p in pair.parameters(m)] for m in MODULES}
    run.optimizer.zero_grad(set_to_none=True)
    if fused == "checkpointing":  # (the expected gradient below: separate forwards, nothing recomputed)
        run.param.model.gradient_checkpointing_disable()

    batch = run.collate(indices)
    ref_scores = run.reference_logps(indices, batch)
    ref = ref_scores[0]  # the totals (the shared-length part is LD-DPO's)
    b, h, hc = batch.num_pairs, {}, {}
    for m in MODULES:
        with pair.routed(m):
            logps, counts, _ = run.scorer(**batch.scorer_inputs())
        rho = (logps - ref) / (counts if objective == "flex-mean" else 1)
        h[m] = beta_c * rho[:b] - beta_r * rho[b:]
        hc[m] = chase_beta[0] * rho[:b] - chase_beta[1] * rho[b:]
    chaser = "slow" if leader == "fast" else "fast"
    push = torch.sigmoid(hc[chaser] - hc[leader]).detach()
    assert push.sub(0.5).abs().max() > 5e-3  # the modules differ: swapping the roles would change the push
    with torch.no_grad():
        step = run.program.forward(run, batch, ref_scores)
    torch.testing.assert_close(step.metrics["ofs/push"], push, rtol=1e-4, atol=1e-6)  # σ(h_S − h_F), per pair
    assert step.shown() == pytest.approx(step.loss_sum.item())  # what a non-finite loss is reported as
    if objective == "sigmoid-gap-clamp":  # every |gap| is beyond the clamp: the chasing term's gradient is 0
        assert (hc[leader] - hc[chaser]).abs().min() > 1e-6
        push = torch.zeros_like(push)
    surrogate = sum((-torch.sigmoid(-h[m]) / b).detach().mul(h[m]).sum()
                    + (-alpha * push / b).mul(hc[m]).sum() for m in MODULES)
    surrogate.backward()
    for m in MODULES:
        for a, e in zip(got[m], (p.grad for p in pair.parameters(m))):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)  # fp32 sums in another order on other CPUs


def test_best_val_fast_exports_the_fast_module_at_its_lowest_held_out_loss(tiny_model_dir, data, tmp_path):
    config = _config(tiny_model_dir, data, tmp_path / "ofs", f"data.eval={data}", "train.lr=2e-2",
                     "train.max_steps=6", "train.eval_steps=1", "ofs.export=best_val_fast", "ofs.slow_lr_ratio=2")
    run = TrainingRun(config)
    run.run()
    record = json.loads((tmp_path / "ofs" / "eval.json").read_text())
    fast_losses = [h["ofs/fast_loss"] for h in record["history"][:-1]]  # steps 1..5; the last: the exported module
    assert len(fast_losses) == 5
    best = run.state["ofs_best_fast"]
    assert best["loss"] <= min(fast_losses) and best["step"] in range(1, 7)
    assert record["after"]["loss"] == pytest.approx(best["loss"], abs=1e-5)  # final/ is that module
    saved = load_file(tmp_path / "ofs" / "best_fast" / "adapter_model.safetensors")
    final = load_file(tmp_path / "ofs" / "final" / "adapter_model.safetensors")
    assert saved.keys() == final.keys() and all(torch.equal(saved[k], final[k]) for k in saved)
    layer = next(iter(run.param.pair.layers))
    assert torch.equal(run.param.pair.layers[layer].lora_A["fast"], saved[f"base_model.model.{layer}.lora_A.weight"])


def test_best_val_fast_without_held_out_pairs_exports_the_last_fast_module(tiny_model_dir, data, tmp_path, caplog):
    run = TrainingRun(_config(tiny_model_dir, data, tmp_path / "r", "data.eval=null", "train.max_steps=2",
                         "ofs.export=best_val_fast"))
    with caplog.at_level("WARNING", logger="preflab.train.ofs"):
        run.run()
    assert "no held-out evaluation after step 0" in caplog.text and run.param.resting == "fast"


def _grads(run, indices=(0, 1, 2, 3)):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in run.param.pair.layers.values():
            for m in ("fast", "slow"):
                layer.lora_B[m].copy_(torch.randn(layer.lora_B[m].shape, generator=generator) * 0.2)
    run.micro_step(list(indices), len(indices), sync=True, scale=1.0)


@pytest.mark.parametrize("scope", ["per_module", "joint"])
def test_gradient_clipping_per_module_or_jointly(tiny_model_dir, data, tmp_path, scope):
    run = TrainingRun(_config(tiny_model_dir, data, tmp_path / "r", f"ofs.clip_scope={scope}"))
    _grads(run)
    pair = run.param.pair
    norms = {m: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in pair.parameters(m)])).item()
             for m in ("fast", "slow")}
    assert norms["fast"] > 1e-3 and norms["slow"] > 1e-3
    limit = 0.5 * min(norms.values())
    record = {}
    total = run.program.clip(run, limit, record)
    assert total == pytest.approx((norms["fast"] ** 2 + norms["slow"] ** 2) ** 0.5, rel=1e-5)
    after = {m: torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in pair.parameters(m)])).item()
             for m in ("fast", "slow")}
    if scope == "per_module":  # each module clipped to the limit on its own
        assert record["ofs/grad_norm_fast"] == pytest.approx(norms["fast"], rel=1e-5)
        assert record["ofs/grad_norm_slow"] == pytest.approx(norms["slow"], rel=1e-5)
        assert after["fast"] == pytest.approx(limit, rel=1e-4) and after["slow"] == pytest.approx(limit, rel=1e-4)
    else:  # both scaled by one factor: their ratio is kept
        assert "ofs/grad_norm_fast" not in record
        assert (after["fast"] ** 2 + after["slow"] ** 2) ** 0.5 == pytest.approx(limit, rel=1e-4)
        assert after["fast"] / after["slow"] == pytest.approx(norms["fast"] / norms["slow"], rel=1e-4)


def test_a_skipped_update_still_closes_the_window_at_its_boundary(tiny_model_dir, data, tmp_path, monkeypatch):
    run = TrainingRun(_config(tiny_model_dir, data, tmp_path / "r", "ofs.swap_interval=2", "train.max_steps=4"))
    original, skipped = TrainingRun.micro_step, {2, 3}

    def micro_step(self, *args, **kwargs):
        return None if self.state["step"] + 1 in skipped else original(self, *args, **kwargs)

    monkeypatch.setattr(TrainingRun, "micro_step", micro_step)
    counts = []
    for _ in range(4):
        run.optimizer_step()
        counts.append(run.program.roles.count)
    assert counts == [1, 0, 0, 0]  # step 1 enters the window, step 2 (skipped) closes it, step 3 adds nothing


def test_a_resumed_run_restores_the_role_state_of_its_checkpoint(tiny_model_dir, data, tmp_path, monkeypatch):
    extra = ["train.max_steps=6", "train.save_steps=5", "ofs.swap_interval=3", "ofs.alpha=0.5"]
    train_until_killed(_config(tiny_model_dir, data, tmp_path / "r", *extra), 5, monkeypatch)
    ckpt = sorted((tmp_path / "r" / "checkpoints").iterdir())[-1]
    saved = json.loads((ckpt / "state.json").read_text())["ofs_roles"]
    assert saved["count"] == 2  # steps 4 and 5 in the open window
    run = TrainingRun(_config(tiny_model_dir, data, tmp_path / "r", *extra))
    run.restore(ckpt)
    assert run.program.roles.state_dict() == saved


@pytest.mark.parametrize("kind", ["lora-dropout-targets", "dora", "ropo", "full"])
def test_a_pair_of_any_parametrization_trains_and_resumes_exactly(tiny_model_dir, data, tmp_path, monkeypatch, kind):
    extra = {"lora-dropout-targets": ["parametrization.dropout=0.1", "parametrization.target_modules=[q_proj,v_proj]"],
             "dora": ["parametrization.kind=dora"],
             "ropo": ["parametrization={kind: ropo, target_modules: [all-linear], factors: [[2, 1], [2, 2]]}"],
             "full": ["parametrization={kind: full}", "train.lr=1e-3"]}[kind]
    extra += ["train.max_steps=4", "train.save_steps=2", "ofs.swap_interval=2", "ofs.alpha=0.5",
              "eval.task=sentiment", "eval.num_prompts=2", "eval.max_new_tokens=4"]  # (generates with the leader)
    train(_config(tiny_model_dir, data, tmp_path / "straight", *extra))
    train_until_killed(_config(tiny_model_dir, data, tmp_path / "killed", *extra), 3, monkeypatch)
    train(_config(tiny_model_dir, data, tmp_path / "killed", *extra))
    a, b = (load_file(sorted((tmp_path / r / "checkpoints").iterdir())[-1] / "trainable.safetensors")
            for r in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    records = _records(tmp_path / "straight")
    assert records[-1]["ofs/gap"] != 0 and records[-1]["loss"] < records[0]["loss"]
    fast = [k for k in a if ".fast" in k or k.startswith("fast.")]
    slow = [k for k in a if ".slow" in k or k.startswith("slow.")]
    assert fast and len(fast) == len(slow)  # both modules checkpointed
    generation = json.loads((tmp_path / "straight" / "eval.json").read_text())["generation"]["sentiment"]
    assert {"gold/reward", "gold/kl"} <= generation.keys()  # (a KL estimate on 2 prompts may be just below 0)


def test_best_val_fast_exports_the_best_module_not_the_last(tiny_model_dir, data, tmp_path, monkeypatch):
    """Held-out losses scripted so that the fast module is best at step 2 of 5: final/ is the fast module as the
    checkpoint of step 2 holds it, not the last one (a resumed run keeps best_fast/ with its checkpoint)."""
    config = _config(tiny_model_dir, data, tmp_path / "ofs", f"data.eval={data}", "train.max_steps=5",
                     "train.eval_steps=1", "train.save_steps=1", "train.save_total_limit=10",
                     "ofs.export=best_val_fast", "ofs.swap_interval=100")
    run = TrainingRun(config)
    real = run.evaluation.held_out

    def scripted(scorer, policy_is_reference=False):
        result = real(scorer, policy_is_reference)
        step, module = run.state["step"], run.param.resting
        return {**result, "loss": 0.1 if (step, module) == (2, "fast") else 1.0 + step}

    monkeypatch.setattr(run.evaluation, "held_out", scripted)
    run.run()
    assert run.state["ofs_best_fast"] == {"step": 2, "loss": 0.1}
    checkpoints = run.run_dir / "checkpoints"
    at_two = load_file(checkpoints / "step-00000002" / "trainable.safetensors")
    later = load_file(checkpoints / "step-00000004" / "trainable.safetensors")
    assert (checkpoints / "step-00000002" / "best_fast").is_dir()  # the checkpoint keeps it
    final = load_file(run.run_dir / "final" / "adapter_model.safetensors")
    checked = 0
    for key, value in at_two.items():  # model.layers.0.mlp.down_proj.lora_B.fast
        if key.endswith(".fast"):
            exported = final["base_model.model." + key.removesuffix(".fast") + ".weight"]
            assert torch.equal(exported, value), key
            checked += not torch.equal(later[key], value)
    assert checked > 0  # the module moved after step 2
    # a run stopped while best_fast/ was being replaced gets the best module back from the checkpoint it resumes
    shutil.rmtree(run.run_dir / "best_fast")
    TrainingRun(config).restore(checkpoints / "step-00000003")
    restored = load_file(run.run_dir / "best_fast" / "adapter_model.safetensors")
    assert restored.keys() == final.keys() and all(torch.equal(restored[k], final[k]) for k in final)
    assert checked > 0


@pytest.mark.parametrize("export", ["fast", "slow", "leader"])
def test_export_names_the_module_final_holds(tiny_model_dir, data, tmp_path, export):
    """fast / slow: that module whatever the roles; leader: the module leading at the end. Outside best_val_fast no
    fast-module evaluation runs and no best_fast/ is written."""
    run = TrainingRun(_config(tiny_model_dir, data, tmp_path / "r", f"data.eval={data}", "train.max_steps=3",
                              "train.eval_steps=1", f"ofs.export={export}", "ofs.swap_interval=1", "ofs.alpha=0.5"))
    run.run()
    wanted = run.program.roles.leader if export == "leader" else export
    assert run.param.resting == wanted
    final = load_file(run.run_dir / "final" / "adapter_model.safetensors")
    layer = next(iter(run.param.pair.layers))
    for factor in ("lora_A", "lora_B"):
        held = final[f"base_model.model.{layer}.{factor}.weight"]
        tensors = {m: getattr(run.param.pair.layers[layer], factor)[m] for m in ("fast", "slow")}
        assert not torch.equal(tensors["fast"], tensors["slow"]) or factor == "lora_A"
        assert torch.equal(held, tensors[wanted])
    record = json.loads((run.run_dir / "eval.json").read_text())
    assert all("ofs/fast_loss" not in h for h in record["history"]) and not (run.run_dir / "best_fast").exists()


def test_best_val_fast_measures_the_fast_module_while_the_slow_one_leads(tiny_model_dir, data, tmp_path, monkeypatch):
    """With the slow module resting (leading), an evaluation is the slow module's, and the fast module is measured
    on its own for best_val_fast; the resting module is put back. A later evaluation only as good as the best does
    not replace it (the earliest best is kept)."""
    run = TrainingRun(_config(tiny_model_dir, data, tmp_path / "r", f"data.eval={data}", "ofs.export=best_val_fast"))
    real, seen = run.evaluation.held_out, []

    def scripted(scorer, policy_is_reference=False):
        result = real(scorer, policy_is_reference)
        seen.append(run.param.resting)
        return {**result, "loss": {"slow": 1.0, "fast": 0.5}[run.param.resting]}

    monkeypatch.setattr(run.evaluation, "held_out", scripted)
    run.param.rest_on("slow")
    run.state["step"] = 1
    result = run.evaluate()
    assert seen == ["slow", "fast"] and run.param.resting == "slow"
    assert result["loss"] == 1.0 and result["ofs/fast_loss"] == 0.5
    assert run.state["ofs_best_fast"] == {"step": 1, "loss": 0.5} and (run.run_dir / "best_fast").is_dir()
    run.state["step"] = 2
    run.evaluate()
    assert run.state["ofs_best_fast"] == {"step": 1, "loss": 0.5}


def test_the_modules_train_at_their_own_rates_from_their_own_starts(tiny_model_dir, data, tmp_path):
    """fast at train.lr, slow at train.lr × ofs.slow_lr_ratio, both with train.weight_decay; ofs.init_same=false
    starts the modules from different A (B = 0 in both: still the reference's function)."""
    run = TrainingRun(_config(tiny_model_dir, data, tmp_path / "r", "ofs.slow_lr_ratio=0.25", "train.weight_decay=0.05",
                              "ofs.init_same=false"))
    fast = {id(p) for p in run.param.parameters("fast")}
    groups = {("fast" if all(id(p) in fast for p in g["params"]) else "slow"): g for g in run.optimizer.param_groups}
    assert groups["fast"]["initial_lr"] == 5e-3 and groups["slow"]["initial_lr"] == pytest.approx(5e-3 * 0.25)
    assert groups["fast"]["weight_decay"] == groups["slow"]["weight_decay"] == 0.05
    layer = next(iter(run.param.pair.layers.values()))
    assert not torch.equal(layer.lora_A["fast"], layer.lora_A["slow"])
    assert not layer.lora_B["fast"].any() and not layer.lora_B["slow"].any()
    same = TrainingRun(_config(tiny_model_dir, data, tmp_path / "s"))
    layer = next(iter(same.param.pair.layers.values()))
    assert torch.equal(layer.lora_A["fast"], layer.lora_A["slow"])
