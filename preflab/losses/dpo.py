"""Sigmoid-DPO family: DPO (with cDPO label smoothing), Flex-DPO and DPOP.

- DPO: Rafailov et al., *Direct Preference Optimization*, arXiv 2305.18290, eq. 7:
  ``ℓ = −log σ(β·h)`` with ``h = ρ⁺ − ρ⁻`` and ``ρ± = logp_θ(y±) − logp_ref(y±)``.
  cDPO (label smoothing ε, Mitchell 2023 note): ``ℓ = −(1−ε)·log σ(βh) − ε·log σ(−βh)``. (TRL 1.16's ``sigmoid``
  ignores its ``label_smoothing``: ε = 0 here is TRL's form.)
- f-DPO: Wang et al., *Beyond Reverse KL*, arXiv 2309.16240, eq. 9: ``h = f'(u⁺) − f'(u⁻)`` with ``u = π_θ/π_ref =
  exp(ρ)`` and ``f_divergence``: ``reverse_kl`` (f' = log u + 1: DPO), ``forward_kl`` (f' = −1/u),
  ``js_divergence`` (f' = log(2u/(1+u))), ``alpha_divergence`` (f' = (1 − u^(−α))/α, ``f_alpha`` α ∈ (0, 1); the
  paper's α, TRL's ``f_alpha_divergence_coef`` is 1 − α; the exponent is clamped at 80 as TRL does). The rewards
  reported stay β·ρ±, as in TRL.
- ``sigmoid_norm`` (TRL's name): the sigmoid objective on per-token log-ratios (``logp_normalize: mean``).
- Flex-DPO: Yan et al., *3D-Properties*, arXiv 2406.07327 App. B.2.1:
  ``ℓ = −log σ(β_c·ρ⁺ − β_r·ρ⁻)``; a smaller ``β_r`` slows the collapse of the rejected likelihood.
- DPOP: Pal et al., *Smaug*, arXiv 2402.13228: ``ℓ = −log σ(β·(h − λ·max(0, −ρ⁺)))``; the penalty acts
  only when the chosen response falls below the reference, inside the sigmoid.

Checked against the hand-computed values of the method spec (tests/losses/test_hand_values.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import LossHParams, LossOutput, PairLogps, dpo_rewards, register_loss, smoothed_logistic

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass(frozen=True)
class SigmoidHParams(LossHParams):
    beta: float = 0.1  # KL strength; typical 0.01–0.5
    label_smoothing: float = 0.0  # ε, probability that a label is flipped; [0, 0.5)
    f_divergence: str = "reverse_kl"  # one of F_DIVERGENCES (f-DPO); reverse_kl is DPO
    f_alpha: float = 0.5  # α of alpha_divergence, in (0, 1)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("beta")
        self._require_label_smoothing()
        self._require_choice("f_divergence", F_DIVERGENCES)
        if not 0.0 < self.f_alpha < 1.0:
            raise ValueError(f"f_alpha: must be in (0, 1), got {self.f_alpha!r}")


def f_prime(rho: Tensor, kind: str, alpha: float) -> Tensor:
    """``f'(u)`` at ``u = exp(ρ)`` without its constants (they cancel in ``f'(u⁺) − f'(u⁻)``)."""
    if kind == "reverse_kl":
        return rho
    if kind == "forward_kl":
        return -torch.exp(-rho)
    if kind == "js_divergence":
        return F.logsigmoid(rho)
    return -torch.exp((-alpha * rho).clamp(max=80.0)) / alpha


def sigmoid_loss(logps: PairLogps, hp: SigmoidHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    h = f_prime(rho_c, hp.f_divergence, hp.f_alpha) - f_prime(rho_r, hp.f_divergence, hp.f_alpha)
    z = hp.beta * h
    losses = smoothed_logistic(z, hp.label_smoothing)
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("sigmoid", sigmoid_loss, SigmoidHParams)


@dataclass(frozen=True)
class SigmoidNormHParams(SigmoidHParams):
    logp_normalize: str = "mean"


register_loss("sigmoid_norm", sigmoid_loss, SigmoidNormHParams)


@dataclass(frozen=True)
class FlexHParams(LossHParams):
    beta_chosen: float = 0.1
    beta_rejected: float = 0.08  # the paper's best on poems and math at beta_chosen 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("beta_chosen", "beta_rejected")

    def kl_strength(self) -> float:
        return self.beta_chosen

    def with_beta(self, beta: float) -> FlexHParams:
        """β⁺ set to ``beta`` and β⁻ scaled with it (their ratio, which sets how fast the rejected likelihood falls,
        is kept)."""
        return replace(self, beta_chosen=beta, beta_rejected=beta * self.beta_rejected / self.beta_chosen)


def flex_loss(logps: PairLogps, hp: FlexHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    losses = -F.logsigmoid(hp.beta_chosen * rho_c - hp.beta_rejected * rho_r)
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta_chosen, hp.beta_rejected))


register_loss("flex", flex_loss, FlexHParams)


@dataclass(frozen=True)
class DPOPHParams(LossHParams):
    beta: float = 0.1
    lambda_: float = 50.0  # penalty weight; Assumption: 50, the common implementation default

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("beta")
        self._require_non_negative("lambda_")


def dpop_loss(logps: PairLogps, hp: DPOPHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    penalty = hp.lambda_ * (-rho_c).clamp(min=0)
    losses = -F.logsigmoid(hp.beta * (rho_c - rho_r - penalty))
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("dpop", dpop_loss, DPOPHParams)
