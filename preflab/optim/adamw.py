"""AdamW (``optim.name: adamw``, the default): ``torch.optim.AdamW`` with ``train.lr``, ``train.adam_betas`` and the
groups' weight decay (``train.weight_decay``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .registry import OptimizerInputs, register_optimizer


@dataclass(frozen=True)
class AdamWSettings:
    """(no settings of its own: learning rate, betas and weight decay are ``train.*``)"""


def build_adamw(inputs: OptimizerInputs, settings: AdamWSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(inputs.groups, lr=inputs.lr, betas=inputs.betas)


register_optimizer("adamw", AdamWSettings, build_adamw)
