"""Parametrizations: which weights move, and what the reference model is.

Every parametrization wraps a loaded causal LM and offers the same small surface
(:class:`~preflab.adapters.base.Parametrization`): the module to train, a context that yields the
reference, the trainable tensors for checkpoints, and the export of the final model. A new one is a
module that calls :func:`register_parametrization`.
"""

from __future__ import annotations

from . import full, lora, ropo  # noqa: F401  (each module registers its kinds)
from .base import Parametrization, ParametrizationSpec, parametrization_registry, register_parametrization

__all__ = ["Parametrization", "ParametrizationSpec", "build_parametrization", "parametrization_registry",
           "register_parametrization"]


def build_parametrization(kind: str, params, model) -> Parametrization:
    return parametrization_registry()[kind].build(model, params)
