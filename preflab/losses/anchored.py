"""Anchored Preference Optimization: D'Oosterlinck et al., *Anchored Preference Optimization and Contrastive
Revisions*, arXiv 2408.06266, eqs. 7–8 (TRL's ``apo_zero`` and ``apo_down``). Not the seed paper's APO, which is
a schedule (``schedule: apo``): these are objectives that anchor each response's likelihood to the reference.

- ``apo_zero`` (the chosen responses are better than the model's own): ``ℓ = (1 − σ(βρ⁺)) + σ(βρ⁻)``, raising
  the chosen and lowering the rejected likelihood.
- ``apo_down`` (the chosen responses are worse than the model's own): ``ℓ = σ(βρ⁺) + (1 − σ(β(ρ⁺ − ρ⁻)))``,
  lowering both, the rejected more.
"""

from __future__ import annotations

import torch

from .base import BetaHParams, LossOutput, PairLogps, dpo_rewards, register_loss


def apo_zero_loss(logps: PairLogps, hp: BetaHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    losses = (1 - torch.sigmoid(hp.beta * rho_c)) + torch.sigmoid(hp.beta * rho_r)
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("apo_zero", apo_zero_loss, BetaHParams)


def apo_down_loss(logps: PairLogps, hp: BetaHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    losses = torch.sigmoid(hp.beta * rho_c) + (1 - torch.sigmoid(hp.beta * (rho_c - rho_r)))
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("apo_down", apo_down_loss, BetaHParams)
