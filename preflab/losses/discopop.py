"""DiscoPOP: Chris Lu et al., *Discovering Preference Optimization Algorithms with and for Large Language
Models*, arXiv 2406.08414, eq. 5 (TRL's ``discopop``; the paper's "log-ratio modulated loss").

With ``z = β·h``: ``ℓ = (1 − w)·(−log σ(z)) + w·exp(−z)``, ``w = σ(z/τ)``: the logistic (DPO) loss for pairs the
policy gets wrong, the exponential loss for pairs it gets right. τ = 0.05, the paper's value, is the default.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import BetaHParams, LossOutput, PairLogps, dpo_rewards, register_loss


@dataclass(frozen=True)
class DiscoPOPHParams(BetaHParams):
    tau: float = 0.05  # temperature of the modulation; > 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("tau")


def discopop_loss(logps: PairLogps, hp: DiscoPOPHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    z = hp.beta * (rho_c - rho_r)
    w = torch.sigmoid(z / hp.tau)
    losses = (1 - w) * -F.logsigmoid(z) + w * torch.exp(-z)
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("discopop", discopop_loss, DiscoPOPHParams)
