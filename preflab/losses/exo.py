"""EXO for pairwise preferences: Ji et al., *Towards Efficient Exact Optimization of Language Model Alignment*,
arXiv 2402.00856, eq. 16 with K = 2 (TRL's ``exo_pair``).

The reverse KL from the policy's preference distribution over the pair, ``q = softmax(β·(ρ⁺, ρ⁻))``, to the
label's, ``p = (1 − ε, ε)``: ``ℓ = q⁺·(log q⁺ − log(1−ε)) + q⁻·(log q⁻ − log ε)`` with ``q⁺ = σ(βh)``. ε > 0 is
needed (ε → 0 diverges); the paper's 1e-3 is the default. (TRL takes ε from ``label_smoothing``, default 0.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import LossHParams, LossOutput, PairLogps, dpo_rewards, register_loss


@dataclass(frozen=True)
class ExoHParams(LossHParams):
    beta: float = 0.1  # β_π
    epsilon: float = 1e-3  # the label distribution's mass on the rejected response; (0, 0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("beta")
        if not 0.0 < self.epsilon < 0.5:
            raise ValueError(f"epsilon: must be in (0, 0.5), got {self.epsilon!r}")


def exo_pair_loss(logps: PairLogps, hp: ExoHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    z = hp.beta * (rho_c - rho_r)
    log_q_w, log_q_l = F.logsigmoid(z), F.logsigmoid(-z)
    losses = (torch.exp(log_q_w) * (log_q_w - math.log1p(-hp.epsilon))
              + torch.exp(log_q_l) * (log_q_l - math.log(hp.epsilon)))
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("exo_pair", exo_pair_loss, ExoHParams)
