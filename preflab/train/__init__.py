"""Training: :func:`train` runs a config's schedule.

Offline-like schedules (``offline``, ``ofs``) are a :class:`~preflab.train.program.StepProgram` that the training loop
(:class:`~preflab.train.loop.TrainingRun`) runs; outer schedules (``apo``, ``cofs``) drive such runs. Each registers
itself (:mod:`preflab.train.schedules`); what is refused is one table (:mod:`preflab.train.compat`). Importing this
package imports nothing heavy (the config's sections import :mod:`preflab.train.settings`): the names below load
on first use.
"""

from __future__ import annotations

__all__ = ["RunResult", "TrainingError", "TrainingRun", "train"]


def train(config):
    """Runs ``config`` under its schedule (refused combinations stop before any work); its :class:`RunResult`.
    Logs as ``preflab train`` does (INFO lines on stderr) unless the application has set up logging itself."""
    from ..adapters.base import check_parametrization
    from ..console import setup_logging
    from .compat import check_compatible
    from .folding import fold_start_adapter
    from .loop import TrainingRun
    from .safety import check_writable
    from .schedules import schedule_registry

    setup_logging()
    check_compatible(config)
    check_parametrization(config.model.name, config.parametrization)  # the settings against the model's layers
    check_writable(config.output_dir)  # every schedule's run directory, before any work
    config = fold_start_adapter(config)  # (init_adapter under a schedule that starts its own modules)
    spec = schedule_registry()[config.schedule]
    return (TrainingRun(config) if spec.program is not None else spec.driver(config)).run()


def __getattr__(name: str):
    if name == "TrainingRun":
        from .loop import TrainingRun

        return TrainingRun
    if name in ("RunResult", "TrainingError"):
        from . import outputs

        return getattr(outputs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
