"""Training: :func:`train` runs a config's schedule.

Offline-like schedules (``offline``, ``ofs``) are a :class:`~preflab.train.program.StepProgram` that the training loop
(:class:`~preflab.train.loop.TrainingRun`) runs; outer schedules (``apo``, ``cofs``) drive such runs. Each registers
itself (:mod:`preflab.train.schedules`); what is refused is one table (:mod:`preflab.train.compat`).
"""

from __future__ import annotations

from . import apo, cofs, offline, ofs  # noqa: F401  (each module registers its schedule)
from .compat import check_compatible
from .loop import TrainingRun
from .outputs import RunResult, TrainingError
from .schedules import schedule_registry

__all__ = ["RunResult", "TrainingError", "TrainingRun", "train"]


def train(config) -> RunResult:
    """Runs ``config`` under its schedule (refused combinations stop before any work)."""
    check_compatible(config)
    spec = schedule_registry()[config.schedule]
    return (TrainingRun(config) if spec.program is not None else spec.driver(config)).run()
