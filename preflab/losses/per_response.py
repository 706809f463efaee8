"""Objectives that score each response against a level of its own rather than only the pair's margin.

- NCA (pairwise): Chen et al., *Noise Contrastive Alignment*, arXiv 2402.05369, eq. 11 (TRL's ``nca_pair``):
  ``ℓ = −log σ(r⁺) − ½·log σ(−r⁺) − ½·log σ(−r⁻)``, ``r± = β·ρ±``; it raises the chosen likelihood in absolute
  terms, not only relative to the rejected one.
- BCO (pairwise): Jung et al., *Binary Classifier Optimization*, arXiv 2404.04656, eq. 7 (TRL's ``bco_pair``):
  ``ℓ = −log σ(r⁺ − δ) − log σ(−(r⁻ − δ))``. The paper's δ is a running mean of the rewards; here δ is the fixed
  ``reward_shift`` (default 0: TRL 1.16's ``bco_pair``, which keeps no running mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import BetaHParams, LossOutput, PairLogps, dpo_rewards, register_loss


def nca_pair_loss(logps: PairLogps, hp: BetaHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    r_c, r_r = hp.beta * rho_c, hp.beta * rho_r
    losses = -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("nca_pair", nca_pair_loss, BetaHParams)


@dataclass(frozen=True)
class BCOHParams(BetaHParams):
    reward_shift: float = 0.0  # δ, subtracted from both rewards


def bco_pair_loss(logps: PairLogps, hp: BCOHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    r_c, r_r = hp.beta * rho_c - hp.reward_shift, hp.beta * rho_r - hp.reward_shift
    losses = -F.logsigmoid(r_c) - F.logsigmoid(-r_r)
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("bco_pair", bco_pair_loss, BCOHParams)
