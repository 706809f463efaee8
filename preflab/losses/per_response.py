"""Objectives that score each response against a level of its own rather than only the pair's margin.

- NCA (pairwise): Chen et al., *Noise Contrastive Alignment*, arXiv 2402.05369, eq. 11 (TRL's ``nca_pair``):
  ``ℓ = −log σ(r⁺) − ½·log σ(−r⁺) − ½·log σ(−r⁻)``, ``r± = β·ρ±``; it raises the chosen likelihood in absolute
  terms, not only relative to the rejected one.
- KTO (pairwise): Ethayarajh et al., *KTO: Model Alignment as Prospect Theoretic Optimization*, arXiv 2402.01306:
  its loss (λ_D = λ_U = 1) on each pair's two responses, LLaMA-Factory's ``kto_pair`` (which runs TRL ≤ 0.9's
  ``DPOTrainer`` ``kto_pair``):
  ``ℓ = ½·[(1 − σ(β·(ρ⁺ − z⁻))) + (1 − σ(β·(z⁺ − ρ⁻)))]`` with the reference points ``z± = max(0, mean_batch ρ±)``
  (the KL estimate of each side from the other half of the batch, as in the KTO report). The ½ makes the mean over
  pairs TRL's mean over its 2B concatenated terms. The paper does not backpropagate through z (``detach_kl: true``,
  the default); TRL's ``kto_pair`` did (``detach_kl: false``). z is a mean over the micro-batch of one process.
- BCO (pairwise): Jung et al., *Binary Classifier Optimization*, arXiv 2404.04656, eq. 7 (TRL's ``bco_pair``):
  ``ℓ = −log σ(r⁺ − δ) − log σ(−(r⁻ − δ))``. By default δ is the paper's: the running mean of every implicit reward
  r± of the training steps so far, this step's included (TRL's ``BCOTrainer`` and its ``RunningMoments``; logged
  as ``delta``), over all processes and, under OFS, both modules; 0 before the first step. It is part of the run's
  checkpointed state and restarts with each run (an APO iteration, a COFS stage: a new reference). A number as
  ``reward_shift`` fixes δ instead: ``reward_shift: 0`` is TRL 1.16's ``DPOTrainer`` ``bco_pair``, which keeps no
  running mean.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import BetaHParams, LossOutput, PairLogps, dpo_rewards, register_loss


def nca_pair_loss(logps: PairLogps, hp: BetaHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    r_c, r_r = hp.beta * rho_c, hp.beta * rho_r
    losses = -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("nca_pair", nca_pair_loss, BetaHParams)


@dataclass(frozen=True)
class KTOPairHParams(BetaHParams):
    detach_kl: bool = True  # the paper's z (no gradient); false: TRL ≤ 0.9's kto_pair


def kto_pair_loss(logps: PairLogps, hp: KTOPairHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    z_c, z_r = rho_c.mean().clamp(min=0), rho_r.mean().clamp(min=0)
    if hp.detach_kl:
        z_c, z_r = z_c.detach(), z_r.detach()
    losses = 0.5 * ((1 - torch.sigmoid(hp.beta * (rho_c - z_r))) + (1 - torch.sigmoid(hp.beta * (z_c - rho_r))))
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("kto_pair", kto_pair_loss, KTOPairHParams)


@dataclass(frozen=True)
class BCOHParams(BetaHParams):
    reward_shift: float | None = None  # δ, subtracted from both rewards; None: the running mean of the rewards

    @property
    def tracks(self) -> bool:
        return self.reward_shift is None

    def tracked(self, logps: PairLogps) -> Tensor:
        rho_c, rho_r = logps.logratios(self.logp_normalize)
        return torch.cat([self.beta * rho_c, self.beta * rho_r])

    def with_tracked_mean(self, mean: float) -> BCOHParams:
        return replace(self, reward_shift=mean)


def bco_pair_loss(logps: PairLogps, hp: BCOHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    if hp.reward_shift is None:
        raise ValueError("bco_pair: reward_shift null is the running mean, which an Objective fills in "
                         "(build it with preflab.losses.build_objective)")
    r_c, r_r = hp.beta * rho_c - hp.reward_shift, hp.beta * rho_r - hp.reward_shift
    losses = -F.logsigmoid(r_c) - F.logsigmoid(-r_r)
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("bco_pair", bco_pair_loss, BCOHParams)
