"""Optimizers by name: each a factory with its own settings, given the parameter groups a schedule makes.

A new optimizer is one module that calls :func:`register_optimizer` with its settings dataclass (the run config's
``optim:`` section is validated against it: unknown keys name the key and close matches) and its factory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimizerInputs:
    """What every factory gets besides its own settings."""

    groups: list[dict]  # parameter groups ({"params": [...], "lr": ..., "weight_decay": ...}), from the schedule
    lr: float  # train.lr
    betas: tuple[float, float]  # train.adam_betas
    named_parameters: dict[str, torch.nn.Parameter]  # the policy's trainable tensors by name
    model_name: str  # model.name: the starting policy
    start_adapter: str | None = None  # the adapter the policy continues training (parametrization.init_adapter)


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    settings: type
    build: Callable[[OptimizerInputs, object], torch.optim.Optimizer]


_REGISTRY: dict[str, OptimizerSpec] = {}


def register_optimizer(name: str, settings: type, build: Callable[[OptimizerInputs, object], torch.optim.Optimizer]
                       ) -> None:
    if name in _REGISTRY:
        raise ValueError(f"optimizer {name!r} registered twice")
    _REGISTRY[name] = OptimizerSpec(name, settings, build)


def optimizer_registry() -> dict[str, OptimizerSpec]:
    return dict(_REGISTRY)


def build_optimizer(name: str, settings, inputs: OptimizerInputs) -> torch.optim.Optimizer:
    return _REGISTRY[name].build(inputs, settings)
