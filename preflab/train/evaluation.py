"""What a run measures besides its training loss: held-out preference metrics (before, every ``train.eval_steps``,
after), the 3D probe and the hyperspherical energy (every ``diag.probe_every`` / ``diag.he_every`` steps), and the
generation-based evaluation at the end (``eval.task``, the main process alone). What needs whole weights (sampling,
the energy, generation) runs on the main process with the run's whole-weight policy, under any engine."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from ..config import Config
from ..data.tokenize import TokenizedPair
from ..eval.diagnostics import ThreeDProbe
from ..eval.energy import EnergyMonitor
from ..eval.generation import GenerationEvaluator
from ..eval.preference import SequenceLogps, preference_metrics, score_pairs
from ..losses import Objective
from ..models.scorer import eval_mode
from .engine import Engine
from .reference import ReferenceLogps

log = logging.getLogger(__name__)


class Evaluation:
    def __init__(self, config: Config, engine: Engine, objective: Objective, reference: ReferenceLogps,
                 train_pairs: list[TokenizedPair], eval_pairs: list[TokenizedPair], pad_id: int):
        self.config, self.engine, self.objective, self.reference = config, engine, objective, reference
        self.eval_pairs, self.pad_id = eval_pairs, pad_id
        self._eval_reference: SequenceLogps | None = None
        diag, tc = config.diag, config.train
        self.probe = None
        if diag.enabled and diag.probe_kind != "none" and not objective.reference_free:
            heldout = list(dict.fromkeys(p.prompt_ids for p in eval_pairs))  # unique, in order
            self.probe = ThreeDProbe(diag, train_pairs, heldout, config.seed, pad_id, tc.eval_batch_size)
        self.energy = EnergyMonitor(diag.he_modules, diag.he_chunk) if diag.enabled and diag.he_every != 0 else None

    def score(self, scorer: torch.nn.Module, pairs: list) -> SequenceLogps:
        """Gradient-free log-probs of ``pairs`` in eval batches and the configured layout."""
        sc = self.config.scorer
        return score_pairs(scorer, pairs, self.config.train.eval_batch_size, self.pad_id, self.engine.device,
                           sc.layout, sc.pack_tokens)

    def held_out(self, policy_scorer: torch.nn.Module, policy_is_reference: bool = False) -> dict | None:
        """The objective's metrics on the held-out pairs (their reference log-probs computed once)."""
        if not self.eval_pairs:
            return None
        if self._eval_reference is None:
            with self.reference.scorer() as ref, eval_mode(ref), self.engine.autocast():
                self._eval_reference = self.score(ref, self.eval_pairs)
        if policy_is_reference:
            policy = self._eval_reference
        else:
            with eval_mode(policy_scorer), self.engine.autocast():
                policy = self.score(policy_scorer, self.eval_pairs)
        return preference_metrics(self.objective, policy, self._eval_reference)

    # -- 3D probe and hyperspherical energy ------------------------------------------------------------------

    def prepare_diagnostics(self, whole: Callable, tokenizer, state: dict, cache, policy_scorer) -> str | None:
        """The probe responses sampled (or read) by the main process from the run's whole-weight policy
        (``whole()``, a collective where weights are sharded: see ``TrainingRun.whole_policy``) and shared, scored
        under the reference by every process; then the reference's energy (main process). The probe's log line
        (None without a probe)."""
        line, engine = None, self.engine
        needs_whole = self.energy is not None
        if self.probe is not None:
            log.info(self.probe.plan(cache))
            t0 = time.perf_counter()
            stored = engine.share(cache is not None and cache.is_file())
            needs_whole = needs_whole or (self.probe.samples and not stored)
        policy = whole() if needs_whole else None
        if self.probe is not None:
            rows = None
            if self.probe.samples:
                reference = policy.reference if policy is not None else None
                rows = engine.share(self.probe.sample(reference, tokenizer, cache) if engine.is_main else None)
            self.probe.prepare(self.reference.scorer(), engine.device, rows)
            self.probe.history = state.setdefault("diag_history", [])  # checkpointed with the run's state
            if not self.probe.history:  # the starting point of every curve (zero when the policy is the reference)
                self.measure_probe(policy_scorer, None)
            line = (f"3D diagnostics: {len(self.probe.seen_rows) // 2} seen pairs, {len(self.probe.probe_rows)} probe "
                    f"responses, prepared in {time.perf_counter() - t0:.1f} s")
        if self.energy is not None and engine.is_main:
            self.energy.prepare(policy.reference)
        return line

    def measure_probe(self, policy_scorer: torch.nn.Module, log_grad_ratio: float | None) -> dict:
        t0 = time.perf_counter()
        with eval_mode(policy_scorer), self.engine.autocast():
            out = self.probe.measure(policy_scorer, self.engine.device, log_grad_ratio)
        out["3d/probe_seconds"] = time.perf_counter() - t0
        return out

    def at_step(self, step: int, last: int, record: dict, policy_scorer, whole: Callable) -> None:
        """The probe (every process) and the energy (main process, on ``whole()``) when their step comes (into
        ``record``)."""
        diag, tc = self.config.diag, self.config.train
        probe_every = diag.probe_every or tc.logging_steps
        if self.probe is not None and (step % probe_every == 0 or step == last):
            record.update(self.measure_probe(policy_scorer, record.get("3d/log_grad_ratio")))
        he_every = diag.he_every or probe_every
        if self.energy is not None and (step % he_every == 0 or step == last):
            policy = whole()
            if self.engine.is_main:
                record.update(self.energy.measure(policy.policy_module()))

    # -- generation ------------------------------------------------------------------------------------------

    def generation(self, tokenizer, model: torch.nn.Module, reference: Callable) -> dict | None:
        """The generation eval of ``eval.task`` (main process: plain models, no collective)."""
        if not self.config.eval.task:
            return None
        evaluator = GenerationEvaluator(tokenizer, self.config.eval)
        return evaluator.evaluate(model, reference)
