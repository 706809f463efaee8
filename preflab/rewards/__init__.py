"""Rewards: programs that score a response to a prompt. One interface for all of them.

A reward is a callable ``(prompts: list[str], responses: list[str]) -> list[float]``; registered rewards
are built by name with :func:`get_reward` (``sentiment``, ``concision``, ``format``, ``capitals``), and
``rm:PATH`` builds a sequence-classification reward model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Reward(Protocol):
    name: str

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]: ...


_REGISTRY: dict[str, Callable[[], Reward]] = {}


def register_reward(name: str):
    def wrap(factory: Callable[[], Reward]):
        _REGISTRY[name] = factory
        return factory

    return wrap


def get_reward(name: str) -> Reward:
    from . import capitals, concision, instructions, sentiment  # noqa: F401  (each registers)

    if name.startswith("rm:"):
        from .model import RewardModelReward

        return RewardModelReward(name[3:])
    if name not in _REGISTRY:
        raise KeyError(f"reward: unknown name {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]()
