"""Tasks: a seeded prompt generator with disjoint train/eval splits, plus the gold reward that judges it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..rewards import Reward, get_reward


@dataclass(frozen=True)
class Task:
    name: str
    prompts: Callable[[str, int], list[str]]  # (split, seed) -> prompts
    reward: str  # name in the reward registry

    def make_reward(self) -> Reward:
        return get_reward(self.reward)


def split_items(items: list, split: str) -> list:
    """The ``split`` share of ``items``: every 8th item (1/8) is held out for ``eval``, the rest is ``train``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
    return [item for i, item in enumerate(items) if (i % 8 == 7) == (split == "eval")]


_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> None:
    _TASKS[task.name] = task


def task_names() -> list[str]:
    get_task("sentiment")  # imports (registers) the built-in tasks
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    from . import capitals, concision, format, sentiment  # noqa: F401  (each registers)

    if name not in _TASKS:
        raise KeyError(f"task: unknown name {name!r}; known: {sorted(_TASKS)}")
    return _TASKS[name]
