"""Hinge (SLiC / RSO) objective: Liu et al., *Statistical Rejection Sampling Improves Preference
Optimization*, arXiv 2309.06657, eq. 9: ``ℓ = max(0, 1 − β·h)``, with ``h = ρ⁺ − ρ⁻``."""

from __future__ import annotations

from .base import BetaHParams, LossOutput, PairLogps, dpo_rewards, register_loss


def hinge_loss(logps: PairLogps, hp: BetaHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    losses = (1 - hp.beta * (rho_c - rho_r)).clamp(min=0)
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("hinge", hinge_loss, BetaHParams)
