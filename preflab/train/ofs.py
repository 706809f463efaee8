"""OFS-DPO (``schedule: ofs``): two LoRA modules on one frozen base chasing each other, as a step of the training loop.

Each micro-batch: one reference pass (the base, or the reference cache), both modules' log-probs (one forward
each, or one routed forward on the duplicated batch with ``ofs.fused_forward``), each module's objective, plus
the chasing term of :mod:`preflab.ofs.chasing` (the leader widens its lead, the chaser closes the gap), one
backward. One optimizer with a parameter group per module (fast: ``train.lr``, slow: × ``ofs.slow_lr_ratio``; the
scheduler scales both alike), gradients clipped per module (``ofs.clip_scope``). Every ``ofs.swap_interval``
steps the module with the lower mean DPO loss over the window leads. Between steps the leader is the policy
that evaluation, generation and the checkpoints' metrics see; ``final/`` is a plain PEFT adapter of the leader
after a last check on the partial window (``ofs.export`` picks a module instead; ``best_val_fast``: the fast module
at its lowest held-out loss, kept in ``best_fast/`` at each evaluation after step 0 — COFS-DPO's choice of a
domain's module). Checkpoints hold both modules, the optimizer state of both groups, the role state and the best
evaluation so far: resume is exact. Two forwards (``forwards = 2``) under DDP: the engine averages the gradients
after the backward; FSDP and DeepSpeed need the fused forward. The spec is ../methods/ofs-cofs.md; what OFS refuses
is in :mod:`preflab.train.compat`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..config import ConfigError
from ..losses import PairLogps
from ..ofs.chasing import RoleState, chasing_term
from ..ofs.module_pair import build_pair
from ..ofs.pair import MODULES, duplicate_rows
from .metrics import pair_metrics
from .outputs import copy_dir_atomically
from .program import StepProgram, StepResult
from .schedules import register_schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OfsSettings:
    """Fast-slow chasing (``schedule: ofs``, preflab.train.ofs): two LoRA modules on one base, the leader widening
    its lead and the chaser closing the gap. The spec is ../methods/ofs-cofs.md (Qi et al., arXiv 2406.05534)."""

    alpha: float = 0.1  # weight of the chasing term
    slow_lr_ratio: float = 0.1  # slow module's lr = train.lr × this
    swap_interval: int = 50  # K: optimizer steps per window; the lower mean DPO loss leads
    beta: float | None = None  # β of the chasing term's margins; null: the objective's own (its reward margins)
    # leader | fast | slow at the end; best_val_fast: the fast module at its lowest held-out loss among the
    # evaluations after step 0 (every train.eval_steps and the last step)
    export: str = field(default="leader", metadata={"choices": ("leader", "fast", "slow", "best_val_fast")})
    init_same: bool = True  # both modules start from the same A (and B = 0)
    chase_stopgrad: bool = True  # false: no stop-gradients (the two terms then cancel exactly)
    gap_clamp: float | None = None  # bound on |h_F − h_S| inside the chasing term
    clip_scope: str = field(default="per_module", metadata={"choices": ("per_module", "joint")})
    # one routed forward on the duplicated batch, or one forward per module (faster on CPU: see bench_ofs_step)
    fused_forward: bool = False

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha: must be >= 0, got {self.alpha}")
        if self.swap_interval < 1:
            raise ValueError(f"swap_interval: must be >= 1, got {self.swap_interval}")
        for name in ("slow_lr_ratio", "beta", "gap_clamp"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}: must be > 0{'' if name == 'slow_lr_ratio' else ' or null'}, got {value}")


class OfsProgram(StepProgram):
    def __init__(self, config):
        super().__init__(config)
        self.settings = config.ofs
        self.roles = RoleState(self.settings.swap_interval)
        self.chase_objective = None

    @property
    def forwards(self) -> int:
        return 1 if self.settings.fused_forward else len(MODULES)

    def parametrization(self, model: torch.nn.Module):
        pc = self.config.parametrization
        return build_pair(pc.name, pc.params, model, self.settings.init_same)

    def param_groups(self, param) -> list[dict]:
        tc, ratio = self.config.train, self.settings.slow_lr_ratio
        return [{"params": param.parameters(m), "lr": tc.lr * (1.0 if m == "fast" else ratio),
                 "weight_decay": tc.weight_decay} for m in MODULES]

    def prepare(self, run) -> None:
        # the chasing term's margins are the objective's reward margins (its β and logp_normalize); ofs.beta sets
        # their β apart from the DPO terms' (Objective.with_beta: every term with a β takes it)
        self.chase_objective = run.objective
        if self.settings.beta is not None:
            try:
                self.chase_objective = run.objective.with_beta(self.settings.beta)
            except ValueError as e:
                raise ConfigError(f"ofs.beta: {e}") from None

    # -- the step -------------------------------------------------------------------------------------------

    def forward(self, run, batch, ref: tuple[Tensor, Tensor] | None) -> StepResult:
        b, s, oc, pair = batch.num_pairs, batch.num_sequences, self.settings, run.param
        logps = {}
        if oc.fused_forward:
            with pair.routed("split", batch.input_ids.shape[0]):
                both = run.scorer(**duplicate_rows(batch).scorer_inputs())
            for m, part in (("fast", slice(0, s)), ("slow", slice(s, 2 * s))):
                logps[m] = PairLogps.of_batch(b, [None if t is None else t[part] for t in both], ref)
        else:
            for m in MODULES:
                with pair.routed(m):
                    logps[m] = PairLogps.of_batch(b, run.scorer(**batch.scorer_inputs()), ref)
        run.objective.observe([logps[m] for m in MODULES], run.engine.reduce)  # both modules' rewards, once a step
        outs = {m: run.objective(logps[m]) for m in MODULES}
        chase = outs if self.chase_objective is run.objective else \
            {m: self.chase_objective(logps[m]) for m in MODULES}
        margins = {m: chase[m].reward_margin for m in MODULES}
        leader, chaser = self.roles.leader, self.roles.chaser
        term, _ = chasing_term(margins[leader], margins[chaser], oc.alpha, oc.chase_stopgrad, oc.gap_clamp)
        loss_sum = outs["fast"].losses.sum() + outs["slow"].losses.sum() + term * b
        metrics = pair_metrics(logps[leader], outs[leader])
        gap = (margins[leader] - margins[chaser]).detach()  # per pair, averaged by the accumulator
        metrics.update({f"ofs/loss_{m}": outs[m].losses.detach() for m in MODULES})
        metrics.update({f"ofs/margin_{m}": margins[m].detach() for m in MODULES})
        metrics.update({"ofs/gap": gap, "ofs/push": torch.sigmoid(-gap)})
        return StepResult(loss_sum, lambda: loss_sum.item(), metrics)

    def recomputation(self, run, batch):
        # a fused step's recomputation (gradient checkpointing) must route rows as its forward did; separate
        # forwards hold their graphs and are refused with checkpointing
        fused = self.settings.fused_forward
        return run.param.routed("split", batch.input_ids.shape[0]) if fused else nullcontext()

    def clip(self, run, max_norm: float, record: dict) -> float:
        pair = run.param
        if self.settings.clip_scope == "joint":
            return run.engine.clip([pair.parameters("fast") + pair.parameters("slow")], max_norm)[0]
        norms = run.engine.clip([pair.parameters(m) for m in MODULES], max_norm)
        record["ofs/grad_norm_fast"], record["ofs/grad_norm_slow"] = norms
        return math.sqrt(sum(n * n for n in norms))

    # -- roles ----------------------------------------------------------------------------------------------

    def after_update(self, run, record: dict) -> None:
        if "ofs/loss_fast" in record:
            self.roles.step(record["step"], record["ofs/loss_fast"], record["ofs/loss_slow"])
        elif record["step"] % self.roles.interval == 0:  # a skipped update adds nothing to the window
            self.roles.decide()
        self._settle(run)
        record["ofs/leader"] = MODULES.index(self.roles.leader)
        record["ofs/swaps"] = self.roles.swaps

    def _settle(self, run) -> None:
        run.state["ofs_roles"] = self.roles.state_dict()
        run.param.rest_on(self.roles.leader)

    def after_restore(self, run) -> None:
        if "ofs_roles" in run.state:
            self.roles.load_state_dict(run.state["ofs_roles"])
        self._settle(run)

    def save_files(self, run, directory) -> None:
        # the best fast module so far travels with the state that names it: best_fast/ may already hold a later
        # evaluation's module when a run stops between a checkpoint and the next
        if (run.run_dir / "best_fast").is_dir():
            shutil.copytree(run.run_dir / "best_fast", directory / "best_fast")

    def restore_files(self, run, checkpoint) -> None:
        if (checkpoint / "best_fast").is_dir():
            copy_dir_atomically(checkpoint / "best_fast", run.run_dir / "best_fast")

    # -- ofs.export -----------------------------------------------------------------------------------------

    def evaluate(self, run, result: dict | None, policy_is_reference: bool) -> dict | None:
        if result is None or policy_is_reference or self.settings.export != "best_val_fast":
            return result
        fast = result
        if run.param.resting != "fast":
            resting = run.param.resting
            run.param.rest_on("fast")
            try:
                fast = run.evaluation.held_out(run.scorer)
            finally:
                run.param.rest_on(resting)
        result = {**result, "ofs/fast_loss": fast["loss"]}
        best = run.state.get("ofs_best_fast")
        if best is None or fast["loss"] < best["loss"]:
            whole = run.whole_policy()  # (under sharding a collective: the main process's whole copy)
            if run.engine.is_main:
                out, tmp = run.run_dir / "best_fast", run.run_dir / ".best_fast.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                whole.save_module("fast", tmp)
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp, out)
            run.engine.barrier()  # the others read best_fast/ at the end of training
            run.state["ofs_best_fast"] = {"step": run.state["step"], "loss": fast["loss"]}
        return result

    def _load_best_fast(self, run) -> None:
        """Puts the best evaluated fast module (``best_fast/``) into the fast slot."""
        best = run.state.get("ofs_best_fast")
        if best is None:
            log.warning("ofs.export=best_val_fast: no held-out evaluation after step 0 (data.eval missing?); "
                        "exporting the final fast module")
            return
        run.param.load_module("fast", run.run_dir / "best_fast")
        log.info("ofs.export=best_val_fast: the fast module of step %d (held-out loss %.4f)", best["step"],
                 best["loss"])

    def finish(self, run) -> None:
        self.roles.decide()  # the last, partial window counts too
        self._settle(run)
        export = self.settings.export
        if export == "best_val_fast":
            # the last step is a candidate too; afterwards the fast slot holds the best module (training is over),
            # which the final evaluation ("after") then measures
            if run.eval_pairs:
                run.evaluate()
            self._load_best_fast(run)
            run.param.rest_on("fast")
        elif export != "leader":
            run.param.rest_on(export)


register_schedule("ofs", OfsSettings, program=OfsProgram)
