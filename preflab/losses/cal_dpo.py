"""Cal-DPO: Xiao et al., *Cal-DPO: Calibrated Direct Preference Optimization*, arXiv 2412.14516, eq. 9.

``ℓ = −log σ(h) + w·[(ρ⁺ − 1/(2β))² + (ρ⁻ + 1/(2β))²]``: a β-free Bradley–Terry term plus a calibration
term pulling the raw log-ratios toward ±1/(2β). ``w`` 0.5 and β 0.002 follow the reference code
tengxiao1/Cal-DPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from .base import LossHParams, LossOutput, PairLogps, dpo_rewards, register_loss


@dataclass(frozen=True)
class CalDPOHParams(LossHParams):
    beta: float = 0.002  # sets the calibration targets ±1/(2β)
    cal_weight: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_positive("beta")
        if self.cal_weight < 0:
            raise ValueError(f"cal_weight: must be >= 0, got {self.cal_weight!r}")


def cal_dpo_loss(logps: PairLogps, hp: CalDPOHParams) -> LossOutput:
    rho_c, rho_r = logps.logratios(hp.logp_normalize)
    target = 1 / (2 * hp.beta)
    calibration = (rho_c - target) ** 2 + (rho_r + target) ** 2
    losses = -F.logsigmoid(rho_c - rho_r) + hp.cal_weight * calibration
    return LossOutput(losses, **dpo_rewards(rho_c, rho_r, hp.beta))


register_loss("cal_dpo", cal_dpo_loss, CalDPOHParams)
