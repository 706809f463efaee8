"""Schedules by name (``schedule:``): the outer loop of a run.

An *offline-like* schedule supplies a :class:`~preflab.train.program.StepProgram` that the training loop runs
(``offline``, ``ofs``); an *outer* schedule drives such runs through their public interface (``apo``: iterations,
``cofs``: domains). A new schedule is one module that calls :func:`register_schedule` with its settings dataclass
and its program or driver, one test and one recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    settings: type  # its settings dataclass
    program: type | None = None  # offline-like: the StepProgram the loop runs
    driver: Callable | None = None  # outer: Config -> an object whose run() drives inner runs


_REGISTRY: dict[str, ScheduleSpec] = {}


def register_schedule(name: str, settings: type, program: type | None = None, driver: Callable | None = None) -> None:
    if name in _REGISTRY:
        raise ValueError(f"schedule {name!r} registered twice")
    if (program is None) == (driver is None):
        raise ValueError(f"schedule {name!r}: give either a step program or a driver")
    _REGISTRY[name] = ScheduleSpec(name, settings, program, driver)


def schedule_registry() -> dict[str, ScheduleSpec]:
    return dict(_REGISTRY)
