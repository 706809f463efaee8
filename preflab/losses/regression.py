"""Squared-regression objectives on log-ratios: IPO and SPPO (hard labels).

- IPO: Azar et al., *A General Theoretical Paradigm to Understand Learning from Human Preferences*,
  arXiv 2310.12036, eq. 17: ``ℓ = (h − 1/(2β))²`` (β is IPO's τ). Assumption: sequence sums, as in the
  paper; ``logp_normalize: mean`` reproduces huggingface/trl, which averages per token for IPO.
- SPPO (hard): Wu et al., *Self-Play Preference Optimization*, arXiv 2405.00675, eq. 3.6 with win
  probability 1 for y⁺ and 0 for y⁻ and the log-partition approximated by η/2, η = 1/β:
  ``ℓ = scale·[(ρ⁺ − 1/(2β))² + (ρ⁻ + 1/(2β))²]``. Assumption: ``scale`` 1 (as trl ``sppo_hard``);
  uclaml/SPPO uses ½. SPPO's own code uses β = 0.001.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import BetaHParams, LossHParams, LossOutput, PairLogps, dpo_rewards, register_loss


def ipo_loss(logps: PairLogps, hp: BetaHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    losses = (rho_c - rho_r - 1 / (2 * hp.beta)) ** 2
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("ipo", ipo_loss, BetaHParams)


@dataclass(frozen=True)
class SPPOHParams(LossHParams):
    beta: float = 0.1
    scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("beta", "scale")


def sppo_hard_loss(logps: PairLogps, hp: SPPOHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    target = 1 / (2 * hp.beta)
    losses = hp.scale * ((rho_c - target) ** 2 + (rho_r + target) ** 2)
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("sppo_hard", sppo_hard_loss, SPPOHParams)
