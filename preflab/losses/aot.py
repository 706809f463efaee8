"""Alignment via Optimal Transport: Melnyk et al., *Distributional Preference Alignment of LLMs via Optimal
Transport*, arXiv 2406.05882 (TRL's ``aot`` and ``aot_unpaired``).

First-order stochastic dominance of the chosen over the rejected distribution, in one dimension: the batch's
values are sorted and compared quantile by quantile, with cDPO's smoothing ε.
- ``aot`` (paired): ``δ_(i) = sort(logp_θ(y⁺) − logp_θ(y⁻))_i − sort(logp_ref(y⁺) − logp_ref(y⁻))_i``.
- ``aot_unpaired``: ``δ_(i) = sort(ρ⁺)_i − sort(ρ⁻)_i``.
``ℓ_i = −(1−ε)·log σ(βδ_(i)) − ε·log σ(−βδ_(i))``. The i-th loss belongs to the i-th quantile, not to pair i
(their mean is the objective), and the sort is over the micro-batch (per process, as in TRL): with one pair per
micro-batch ``aot`` is DPO. The rewards reported are DPO's, pair by pair.
"""

from __future__ import annotations

import torch

from .base import LossOutput, PairLogps, dpo_rewards, register_loss, smoothed_logistic
from .robust import RobustHParams


def aot_loss(logps: PairLogps, hp: RobustHParams) -> LossOutput:
    (rc, rr), (pc, pr) = logps.reference(hp.logp_normalize), logps.policy(hp.logp_normalize)
    delta = torch.sort(pc - pr).values - torch.sort(rc - rr).values
    return LossOutput(smoothed_logistic(hp.beta * delta, hp.label_smoothing), **dpo_rewards(pc - rc, pr - rr, hp.beta))


register_loss("aot", aot_loss, RobustHParams)


def aot_unpaired_loss(logps: PairLogps, hp: RobustHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    delta = torch.sort(rho_c).values - torch.sort(rho_r).values
    return LossOutput(smoothed_logistic(hp.beta * delta, hp.label_smoothing), **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("aot_unpaired", aot_unpaired_loss, RobustHParams)
