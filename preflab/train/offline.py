"""The offline schedule (``schedule: offline``, the default): epochs over a fixed preference dataset; each step one
policy forward for chosen and rejected (in the scorer's layout), the objective against the reference log-probs."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..losses import PairLogps
from .metrics import pair_metrics
from .program import StepProgram, StepResult
from .schedules import register_schedule


@dataclass(frozen=True)
class OfflineSettings:
    """(no settings of its own: the loop's are ``train.*``)"""


class OfflineProgram(StepProgram):
    def forward(self, run, batch, ref: tuple[Tensor, Tensor] | None) -> StepResult:
        pair = PairLogps.of_batch(batch.num_pairs, run.scorer(**batch.scorer_inputs()), ref)
        run.objective.observe([pair], run.engine.reduce)
        out = run.objective(pair)
        return StepResult(out.losses.sum(), lambda: out.losses.mean().item(), pair_metrics(pair, out))


register_schedule("offline", OfflineSettings, program=OfflineProgram, continues_adapter=True)
