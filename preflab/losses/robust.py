"""Robust DPO: Chowdhury, Kini, Natarajan, *Provably Robust DPO*, arXiv 2403.00409, eq. 8 (TRL's ``robust``).

An unbiased estimate of the clean DPO loss when each label is flipped with probability ε:
``ℓ = [−(1−ε)·log σ(βh) + ε·log σ(−βh)] / (1 − 2ε)``, ``h = ρ⁺ − ρ⁻``. ε = 0 is DPO. Unlike cDPO's smoothing it
is not bounded below (a clean pair with a large margin has a negative loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import LossHParams, LossOutput, PairLogps, dpo_rewards, register_loss


@dataclass(frozen=True)
class RobustHParams(LossHParams):
    beta: float = 0.1
    label_smoothing: float = 0.0  # ε, the assumed label-flip rate; [0, 0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("beta")
        self._require_label_smoothing()


def robust_loss(logps: PairLogps, hp: RobustHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    z, eps = hp.beta * (rho_c - rho_r), hp.label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("robust", robust_loss, RobustHParams)
