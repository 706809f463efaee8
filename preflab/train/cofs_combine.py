"""COFS-DPO's combination of the domains' modules: the weights on the simplex chosen on the replay buffers, and the
combination folded into the weights (spec ofs-cofs.md §2).

Every D_j and C_d is a coefficient vector over the stored modules ("atoms"), combined exactly: LoRA modules by their
factors (:mod:`preflab.ofs.combine`: concatenated, exported as one PEFT adapter), modules of any parametrization by
their dense weight changes (:mod:`preflab.ofs.dense`) — ``cofs.combine``.
"""

from __future__ import annotations

import logging
import shutil

import torch

from ..data.collate import collate_pairs
from ..eval.preference import preference_metrics
from ..losses import PairLogps
from ..models.loader import load_model
from ..models.scorer import SequenceScorer, eval_mode
from ..ofs.combine import AtomMixture, fold_into, read_lora_adapter, save_concat_adapter
from ..ofs.dense import DenseMixture, fold_dense, read_delta
from ..ofs.weights import grid_choice, pgd_choice
from .outputs import write_json

log = logging.getLogger(__name__)


class Combination:
    """The combination step of a ``schedule: cofs`` run (``runner``: its :class:`~preflab.train.cofs.DomainsRun`)."""

    def __init__(self, runner):
        self.runner, self.cc = runner, runner.config.cofs
        kind = runner.config.parametrization.name
        self.dense = self.cc.combine == "dense" or (self.cc.combine == "auto" and kind != "lora")

    def modules(self, d: int) -> list:
        """The stored modules of stages 1..d+1 (LoRA factors per layer, or dense changes per tensor)."""
        r = self.runner
        if self.dense:
            return [read_delta(r.stage_dir(j) / "module") for j in range(d + 1)]
        return [read_lora_adapter(r.stage_dir(j) / "train" / "final") for j in range(d + 1)]

    def mixture(self, model: torch.nn.Module, modules: list):
        return DenseMixture(model, modules) if self.dense else AtomMixture(model, modules)

    def fold(self, model: torch.nn.Module, modules: list, coeffs: list[float]) -> None:
        (fold_dense if self.dense else fold_into)(model, modules, coeffs)

    def delta_coeffs(self, d: int, previous: list[dict]) -> list[float]:
        """D_d over the atoms 1..d: e_d, plus C_{d−1} when the module was trained on top of it."""
        coeffs = [0.0] * (d + 1)
        if d > 0 and self.cc.init == "from_combined":
            coeffs[:d] = previous[d - 1]["cofs"]["combined_coeffs"]
        coeffs[d] = 1.0
        return coeffs

    def choose_weights(self, modules: list, deltas: list[list[float]], d: int) -> dict:
        """Weights over D_1..D_{d+1} on the union of the buffers (policy θ₀ + C(w), reference θ₀)."""
        r, n = self.runner, d + 1
        if n == 1:
            return {"weights": [1.0], "objective": None, "tried": []}
        pairs = [p for j in range(n) for p in r.load(str(r.stage_dir(j) / "buffer.jsonl"), "train")]
        model = load_model(r.config.model.name, r.config.model.dtype,
                           r.config.model.attn_implementation).to(r.device)
        mixture = self.mixture(model, modules)
        mixture.set(None)
        reference = r.score(model, pairs)
        basis = torch.tensor(deltas, dtype=torch.float64)  # (modules, atoms)
        accuracy = self.cc.select_metric == "pref_acc"

        def metrics(w) -> dict:
            mixture.set(torch.as_tensor(w, dtype=torch.float64) @ basis)
            return preference_metrics(r.objective, r.score(model, pairs), reference)

        if n <= self.cc.grid_max_domains:
            key = "rewards/accuracies" if accuracy else "loss"
            choice = grid_choice(lambda w: metrics(w)[key], n, self.cc.grid_step, maximize=accuracy)
        else:
            choice = pgd_choice(lambda w: self._loss_and_grad(model, mixture, basis, w, pairs, reference, accuracy),
                                n, self.cc.pgd_steps, self.cc.pgd_lr, maximize=accuracy,
                                optimizer=self.cc.pgd_optimizer)
        log.info("cofs stage %d: weights %s (%s %.4f over %d buffer pairs, %d candidates)", n,
                 [round(w, 4) for w in choice.weights], self.cc.select_metric, choice.objective, len(pairs),
                 len(choice.tried))
        return {"weights": list(choice.weights), "objective": choice.objective, "tried": choice.tried,
                "buffer_pairs": len(pairs)}

    def _loss_and_grad(self, model, mixture, basis, w, pairs, reference, accuracy: bool) -> float:
        """The mean objective over ``pairs`` at θ₀ + C(w), its gradient accumulated into ``w.grad`` batch by batch."""
        r = self.runner
        sc, bs = r.config.scorer, r.config.train.eval_batch_size
        scorer, n, loss_sum, correct = SequenceScorer(model, sc.chunk_size), len(pairs), 0.0, 0.0
        with eval_mode(model):
            for start in range(0, n, bs):
                idx = list(range(start, min(start + bs, n)))
                batch = collate_pairs([pairs[i] for i in idx], r.tokenizer.pad_token_id, sc.layout,
                                      sc.pack_tokens).to(r.device)
                mixture.set(w @ basis)
                scores = scorer(**batch.scorer_inputs())
                ref = [torch.cat([chosen[idx], rejected[idx]]).to(scores.logps) for chosen, rejected in
                       ((reference.chosen, reference.rejected), (reference.chosen_shared, reference.rejected_shared))]
                logps = PairLogps.of_batch(len(idx), scores, ref)
                out = r.objective(logps)
                (out.losses.sum() / n).backward()
                loss_sum += out.losses.sum().item()
                rho_c, rho_r = logps.logratios("sum")
                correct += (rho_c > rho_r).sum().item()
        return correct / n if accuracy else loss_sum / n

    def combine(self, d: int, previous: list[dict]) -> tuple[torch.nn.Module, dict]:
        """C_d from the stored modules; returns θ₀ + C_d (dense) and the stage's ``cofs`` record."""
        r, modules = self.runner, self.modules(d)
        deltas = [previous[j]["cofs"]["delta_coeffs"] for j in range(d)] + [self.delta_coeffs(d, previous)]
        deltas = [c + [0.0] * (d + 1 - len(c)) for c in deltas]  # over atoms 1..d+1
        choice = self.choose_weights(modules, deltas, d)
        combined = [sum(w * c[k] for w, c in zip(choice["weights"], deltas)) for k in range(d + 1)]
        out = r.stage_dir(d)
        record = {"weights": choice["weights"], "objective": choice["objective"], "delta_coeffs": deltas[-1],
                  "combined_coeffs": combined}
        if r.main:
            write_json(out / "combine.json", {**choice, "delta_coeffs": deltas, "combined_coeffs": combined})
        if not self.dense:  # the combination as one PEFT adapter on θ₀ (rank: the nonzero modules' ranks)
            record["adapter_rank"] = sum(m[next(iter(m))].A.shape[0] for m, c in zip(modules, combined) if c != 0)
            if r.main:
                shutil.rmtree(out / "combined", ignore_errors=True)
                save_concat_adapter(modules, combined, out / "combined", r.config.model.name)
        model = load_model(r.config.model.name, r.config.model.dtype, r.config.model.attn_implementation)
        self.fold(model, modules, combined)
        return model, record

