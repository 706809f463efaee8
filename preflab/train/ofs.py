"""OFS-DPO (``schedule: ofs``): two LoRA modules on one frozen base chasing each other, on the offline loop.

Each micro-batch: one reference pass (the base, or the reference cache), both modules' log-probs (one forward
each, or one routed forward on the duplicated batch with ``ofs.fused_forward``), each module's objective, plus
the chasing term of :mod:`preflab.ofs.chasing` (the leader widens its lead, the chaser closes the gap), one
backward. One AdamW with a parameter group per module (fast: ``train.lr``, slow: × ``ofs.slow_lr_ratio``; the
scheduler scales both alike), gradients clipped per module (``ofs.clip_scope``). Every ``ofs.swap_interval``
steps the module with the lower mean DPO loss over the window leads. Between steps the leader is the policy
that evaluation, generation and the checkpoints' metrics see; ``final/`` is a plain PEFT adapter of the leader
after a last check on the partial window (``ofs.export`` picks a module instead; ``best_val_fast``: the fast module
at its lowest held-out loss, kept in ``best_fast/`` at each evaluation after step 0 — COFS-DPO's choice of a
domain's module). Checkpoints hold both modules, the optimizer state of both groups, the role state and the best
evaluation so far: resume is exact. Under DDP the fused forward is required (DDP synchronises one forward per
backward). The spec is ../methods/ofs-cofs.md.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from contextlib import nullcontext

import torch
from safetensors.torch import load_file

from ..config import Config, ConfigError
from ..losses import PairLogps
from ..ofs.chasing import RoleState, chasing_term
from ..ofs.pair import MODULES, FastSlowPair, duplicate_rows
from .loop import OfflineRun
from .metrics import pair_metrics

log = logging.getLogger(__name__)

class OfsRun(OfflineRun):
    def __init__(self, config: Config):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not config.ofs.fused_forward:
            raise ConfigError("schedule: ofs under several processes needs ofs.fused_forward=true (DDP synchronises "
                              "one forward per backward; the routed forward runs both modules in one)")
        if config.parametrization.name != "lora":
            raise ConfigError(f"schedule: ofs trains a pair of LoRA modules; parametrization.kind is "
                              f"{config.parametrization.name!r} (set parametrization.kind=lora)")
        params = config.parametrization.params
        if params.dropout or params.target_modules != ("all-linear",):
            raise ConfigError("schedule: ofs: the fast/slow pair takes parametrization.dropout=0 and "
                              "target_modules=[all-linear]")
        if config.optim.name != "adamw":
            raise ConfigError("schedule: ofs uses AdamW (one parameter group per module); set optim.name=adamw")
        if config.train.gradient_checkpointing and not config.ofs.fused_forward:
            raise ConfigError("schedule: ofs with train.gradient_checkpointing needs ofs.fused_forward=true (the "
                              "recomputation of two separate forwards would not know which module ran)")
        super().__init__(config)
        if self.objective.reference_free:
            raise ConfigError("schedule: ofs needs an objective with a reference (its margins are log-ratios)")
        oc = config.ofs
        # the chasing term's margins are the objective's reward margins (its β and logp_normalize); ofs.beta sets
        # their β apart from the DPO terms' (Objective.with_beta: every term with a β takes it)
        self.chase_objective = self.objective
        if oc.beta is not None:
            try:
                self.chase_objective = self.objective.with_beta(oc.beta)
            except ValueError as e:
                raise ConfigError(f"ofs.beta: {e}") from None
        self.roles = RoleState(oc.swap_interval)

    def build_parametrization(self, model: torch.nn.Module) -> FastSlowPair:
        params = self.config.parametrization.params
        return FastSlowPair(model, params.r, params.alpha, self.config.ofs.init_same)

    def build_optimizer(self) -> torch.optim.Optimizer:
        tc, ratio = self.config.train, self.config.ofs.slow_lr_ratio
        groups = [{"params": self.param.pair.parameters(m), "lr": tc.lr * (1.0 if m == "fast" else ratio),
                   "weight_decay": tc.weight_decay} for m in MODULES]
        return torch.optim.AdamW(groups, lr=tc.lr, betas=tc.adam_betas)

    def clip_gradients(self, max_norm: float, record: dict) -> float:
        if self.config.ofs.clip_scope == "joint":
            return super().clip_gradients(max_norm, record)
        norms = [float(torch.nn.utils.clip_grad_norm_(self.param.pair.parameters(m), max_norm)) for m in MODULES]
        record["ofs/grad_norm_fast"], record["ofs/grad_norm_slow"] = norms
        return math.sqrt(sum(n * n for n in norms))

    def micro_step(self, indices: list[int], global_size: int, sync: bool, scale: float) -> dict | None:
        batch = self.collate(indices)
        ref = self.reference_logps(indices, batch)
        b, s, oc, pair = batch.num_pairs, batch.num_sequences, self.config.ofs, self.param.pair

        def pair_logps(logps, counts):
            return PairLogps(logps[:b], logps[b:], ref[:b], ref[b:], counts[:b], counts[b:])

        logps = {}
        with (nullcontext() if sync else self.accelerator.no_sync(self.scorer)), self.accelerator.autocast():
            rows = batch.input_ids.shape[0]
            if oc.fused_forward:
                with pair.routed("split", rows):
                    both, counts = self.scorer(**duplicate_rows(batch).scorer_inputs())
                logps = {"fast": pair_logps(both[:s], counts[:s]), "slow": pair_logps(both[s:], counts[s:])}
            else:
                for m in MODULES:
                    with pair.routed(m):
                        lp, counts = self.scorer(**batch.scorer_inputs())
                    logps[m] = pair_logps(lp, counts)
            outs = {m: self.objective(logps[m]) for m in MODULES}
            chase = outs if self.chase_objective is self.objective else \
                {m: self.chase_objective(logps[m]) for m in MODULES}
            margins = {m: chase[m].reward_margin for m in MODULES}
            leader, chaser = self.roles.leader, self.roles.chaser
            term, _ = chasing_term(margins[leader], margins[chaser], oc.alpha, oc.chase_stopgrad, oc.gap_clamp)
            loss = (outs["fast"].losses.sum() + outs["slow"].losses.sum() + term * b) / global_size * self.world
            if self._anywhere(not torch.isfinite(loss).item()):
                self._nonfinite(f"non-finite loss ({loss.item()})", indices)
                return None
            # a fused step's recomputation (gradient checkpointing) must route rows as its forward did; separate
            # forwards hold their graphs and are refused with checkpointing
            with pair.routed("split", rows) if oc.fused_forward else nullcontext():
                self.backward(loss * scale, sync)
        self.state["tokens"] += batch.num_tokens
        record = pair_metrics(logps[leader], outs[leader])
        gap = (margins[leader] - margins[chaser]).detach()  # per pair, averaged by the accumulator
        record.update({f"ofs/loss_{m}": outs[m].losses.detach() for m in MODULES})
        record.update({f"ofs/margin_{m}": margins[m].detach() for m in MODULES})
        record.update({"ofs/gap": gap, "ofs/push": torch.sigmoid(-gap)})
        return record

    def optimizer_step(self) -> dict:
        record = super().optimizer_step()
        if "ofs/loss_fast" in record:
            self.roles.step(record["step"], record["ofs/loss_fast"], record["ofs/loss_slow"])
        elif record["step"] % self.roles.interval == 0:  # a skipped update adds nothing to the window
            self.roles.decide()
        self._settle()
        record["ofs/leader"] = MODULES.index(self.roles.leader)
        record["ofs/swaps"] = self.roles.swaps
        return record

    def _settle(self) -> None:
        self.state["ofs_roles"] = self.roles.state_dict()
        self.param.rest_on(self.roles.leader)

    def restore(self, path) -> None:
        super().restore(path)
        if "ofs_roles" in self.state:
            self.roles.load_state_dict(self.state["ofs_roles"])
        self._settle()

    # -- ofs.export: best_val_fast --------------------------------------------------------------------------

    def evaluate(self, policy_is_reference: bool = False) -> dict | None:
        result = super().evaluate(policy_is_reference)
        if result is None or policy_is_reference or self.config.ofs.export != "best_val_fast":
            return result
        fast = result
        if self.param.resting != "fast":
            resting = self.param.resting
            self.param.rest_on("fast")
            try:
                fast = super().evaluate()
            finally:
                self.param.rest_on(resting)
        result = {**result, "ofs/fast_loss": fast["loss"]}
        best = self.state.get("ofs_best_fast")
        if best is None or fast["loss"] < best["loss"]:
            if self.accelerator.is_main_process:
                out, tmp = self.run_dir / "best_fast", self.run_dir / ".best_fast.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                self.param.pair.save_adapter("fast", tmp)
                shutil.rmtree(out, ignore_errors=True)
                os.replace(tmp, out)
            self.accelerator.wait_for_everyone()  # the others read best_fast/ at the end of training
            self.state["ofs_best_fast"] = {"step": self.state["step"], "loss": fast["loss"]}
        return result

    def _load_best_fast(self) -> None:
        """Puts the best evaluated fast module (``best_fast/``) into the fast slot."""
        best = self.state.get("ofs_best_fast")
        if best is None:
            log.warning("ofs.export=best_val_fast: no held-out evaluation after step 0 (data.eval missing?); "
                        "exporting the final fast module")
            return
        saved = load_file(self.run_dir / "best_fast" / "adapter_model.safetensors")
        with torch.no_grad():
            for name, layer in self.param.pair.layers.items():
                for kind in ("lora_A", "lora_B"):
                    getattr(layer, kind)["fast"].copy_(saved[f"base_model.model.{name}.{kind}.weight"])
        log.info("ofs.export=best_val_fast: the fast module of step %d (held-out loss %.4f)", best["step"],
                 best["loss"])

    def finish_training(self) -> None:
        self.roles.decide()  # the last, partial window counts too
        self._settle()
        export = self.config.ofs.export
        if export == "best_val_fast":
            # the last step is a candidate too; afterwards the fast slot holds the best module (training is over),
            # which the final evaluation ("after") then measures
            if self.eval_pairs:
                self.evaluate()
            self._load_best_fast()
            self.param.rest_on("fast")
        elif export != "leader":
            self.param.rest_on(export)
