"""Schedules by name (``schedule:``): the outer loop of a run.

An *offline-like* schedule supplies a :class:`~preflab.train.program.StepProgram` that the training loop runs
(``offline``, ``ofs``); an *outer* schedule drives such runs through their public interface (``apo``: iterations,
``cofs``: domains). A new schedule is one module that calls :func:`register_schedule` with its settings dataclass
and its program or driver, one test and one recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _reads_nothing(sections: dict) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    settings: type  # its settings dataclass: the config section named after the schedule
    program: type | None = None  # offline-like: the StepProgram the loop runs
    driver: Callable | None = None  # outer: Config -> an object whose run() drives inner runs
    uses: Callable[[dict], tuple[str, ...]] = _reads_nothing  # other schedules' sections it reads (by settings)
    # it continues a saved adapter (parametrization.init_adapter) itself; else the run folds it into the weights
    # first and the schedule starts its own modules there (preflab.train.folding)
    continues_adapter: bool = False


_REGISTRY: dict[str, ScheduleSpec] = {}
_MODULES = ("offline", "ofs", "apo", "cofs")  # the modules that register the built-in schedules


def register_schedule(name: str, settings: type, program: type | None = None, driver: Callable | None = None,
                      uses: Callable[[dict], tuple[str, ...]] = _reads_nothing,
                      continues_adapter: bool = False) -> None:
    if name in _REGISTRY:
        raise ValueError(f"schedule {name!r} registered twice")
    if (program is None) == (driver is None):
        raise ValueError(f"schedule {name!r}: give either a step program or a driver")
    _REGISTRY[name] = ScheduleSpec(name, settings, program, driver, uses, continues_adapter)


def schedule_registry() -> dict[str, ScheduleSpec]:
    """Every registered schedule (the built-in ones imported on first use)."""
    import importlib

    for module in _MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return dict(_REGISTRY)


def pin_for_inner_runs(config):
    """The config an outer schedule builds its inner runs from: what names "the starting model" by default is pinned
    to the run's own starting model, not each inner run's (an online merging optimizer's θ_SFT: ``optim.sft_model``)."""
    import dataclasses

    settings = config.optim.params
    if getattr(settings, "sft_model", "unset") is None:
        optim = dataclasses.replace(config.optim, params=dataclasses.replace(settings, sft_model=config.model.name))
        return dataclasses.replace(config, optim=optim)
    return config
