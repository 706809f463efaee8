"""Reference-free objectives: no reference model, no reference forward, no reference cache.

- SimPO: Meng, Xia, Chen, *SimPO*, arXiv 2405.14734, eq. 6: ``ℓ = −log σ(β·(l̄⁺ − l̄⁻) − γ)`` with the
  length-normalized log-likelihoods ``l̄ = logp_θ(y)/|y|`` (``logp_normalize: mean``, the default) and the target
  margin γ. The paper's β is 2.0–2.5 and γ 0.5–1.6 (γ/β ≈ 0.5): defaults β = 2.0, γ = 1.0. cDPO's smoothing ε as
  in TRL's ``CPOTrainer(loss_type="simpo")`` and LLaMA-Factory's ``simpo``.
- ORPO: Hong, Lee, Thorne, *ORPO*, arXiv 2403.07691, eqs. 6–7: ``ℓ = −l̄⁺ − λ·log σ(log odds(y⁺) − log odds(y⁻))``
  with ``odds(y) = P/(1 − P)``, ``P = exp(l̄)`` (the per-token mean likelihood, as the paper defines it). λ = 0.1,
  the paper's. The NLL term is per pair (the mean of each chosen response's tokens); TRL and LLaMA-Factory
  average over all chosen tokens of the batch instead, which differs when lengths differ.
- CPO: Xu et al., *Contrastive Preference Optimization*, arXiv 2401.08417, eq. 3: ``ℓ = −log σ(β·(logp⁺ −
  logp⁻)) − α·l̄⁺``: DPO's sigmoid on the policy's own summed log-probs, plus the chosen response's NLL (per
  token, as the paper's code and TRL's ``cpo_alpha`` compute it; ``nll_normalize: sum`` for eq. 3 literally).

The rewards reported are β·l (λ·l̄ for ORPO), the policy's own, as TRL's trainers log them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import NORMALIZE_CHOICES, LossHParams, LossOutput, PairLogps, dpo_rewards, register_loss, smoothed_logistic


@dataclass(frozen=True)
class SimPOHParams(LossHParams):
    logp_normalize: str = "mean"
    beta: float = 2.0
    gamma: float = 1.0  # target reward margin; >= 0
    label_smoothing: float = 0.0  # [0, 0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("beta")
        self._require_non_negative("gamma")
        self._require_label_smoothing()


def simpo_loss(logps: PairLogps, hp: SimPOHParams) -> LossOutput:
    l_c, l_r = logps.policy(hp.logp_normalize)
    z = hp.beta * (l_c - l_r) - hp.gamma
    losses = smoothed_logistic(z, hp.label_smoothing)
    return LossOutput(losses, **dpo_rewards(l_c, l_r, hp.beta))


register_loss("simpo", simpo_loss, SimPOHParams, reference_free=True)


@dataclass(frozen=True)
class ORPOHParams(LossHParams):
    logp_normalize: str = "mean"
    lambda_: float = 0.1  # weight of the odds-ratio term; > 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("lambda_")


def log_odds(logp: torch.Tensor) -> torch.Tensor:
    """``log(P/(1 − P))`` from ``log P < 0``; ``log(1 − P) = log(−expm1(log P))``, exact near P = 1."""
    return logp - torch.log(-torch.expm1(logp))


def orpo_loss(logps: PairLogps, hp: ORPOHParams) -> LossOutput:
    l_c, l_r = logps.policy(hp.logp_normalize)
    losses = -l_c - hp.lambda_ * F.logsigmoid(log_odds(l_c) - log_odds(l_r))
    return LossOutput(losses, **dpo_rewards(l_c, l_r, hp.lambda_))


register_loss("orpo", orpo_loss, ORPOHParams, reference_free=True)


@dataclass(frozen=True)
class CPOHParams(LossHParams):
    beta: float = 0.1
    alpha: float = 1.0  # weight of the NLL term; >= 0 (0: the preference term alone)
    nll_normalize: str = "mean"  # the NLL per token (mean) or summed over the response (sum, eq. 3 literally)
    label_smoothing: float = 0.0  # [0, 0.5)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("beta")
        self._require_non_negative("alpha")
        self._require_choice("nll_normalize", NORMALIZE_CHOICES)
        self._require_label_smoothing()


def cpo_loss(logps: PairLogps, hp: CPOHParams) -> LossOutput:
    l_c, l_r = logps.policy(hp.logp_normalize)
    z = hp.beta * (l_c - l_r)
    prefer = smoothed_logistic(z, hp.label_smoothing)
    nll = -logps.policy(hp.nll_normalize)[0]
    return LossOutput(prefer + hp.alpha * nll, **dpo_rewards(l_c, l_r, hp.beta))


register_loss("cpo", cpo_loss, CPOHParams, reference_free=True)
