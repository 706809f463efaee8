"""Objectives: pure functions of per-sequence log-probs, registered by name.

>>> from preflab.losses import build_objective
>>> objective = build_objective([{"name": "sigmoid", "beta": 0.1}, {"name": "sft", "weight": 0.1}])
"""

from __future__ import annotations

from . import cal_dpo, dpo, hinge, regression, sft  # noqa: F401  (each module registers its losses)
from .base import LossHParams, LossOutput, Objective, PairLogps, loss_registry, register_loss

__all__ = ["LossHParams", "LossOutput", "Objective", "PairLogps", "build_objective", "loss_registry",
           "register_loss"]


def build_objective(terms: list[dict]) -> Objective:
    """An :class:`Objective` from term mappings ``{"name": ..., **hparams}`` (already validated)."""
    registry = loss_registry()
    built = []
    for term in terms:
        term = dict(term)
        spec = registry[term.pop("name")]
        built.append((spec, spec.hparams(**term)))
    return Objective(tuple(built))
