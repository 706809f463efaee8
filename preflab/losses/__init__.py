"""Objectives: pure functions of per-sequence log-probs, registered by name.

>>> from preflab.losses import build_objective
>>> objective = build_objective([{"name": "sigmoid", "beta": 0.1}, {"name": "sft", "weight": 0.1}])
"""

from __future__ import annotations

from . import (  # noqa: F401  (each module registers its losses)
    anchored,
    aot,
    cal_dpo,
    discopop,
    dpo,
    exo,
    hinge,
    per_response,
    reference_free,
    regression,
    robust,
    sft,
)
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
