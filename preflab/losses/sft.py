"""SFT / NLL term on the chosen response, to add to any objective with a weight γ.

Yan et al., *3D-Properties*, arXiv 2406.07327 eq. 7 (SFT-DPO); RPO (Pang et al., arXiv 2404.19733) uses
weight 1 with a length-normalised NLL. ``ℓ = −logp_θ(y⁺)`` (``normalize: sum``, eq. 7 literally) or
``−logp_θ(y⁺)/|y⁺|`` (``mean``, the default; Assumption). Reference-free. With γ > 0 it keeps
``∂ℓ/∂π⁺ ≈ −γ/π⁺`` from vanishing when the rejected likelihood collapses.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import NORMALIZE_CHOICES, LossHParams, LossOutput, PairLogps, register_loss


@dataclass(frozen=True)
class SFTHParams(LossHParams):
    normalize: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        self._require_choice("normalize", NORMALIZE_CHOICES)
        if self.logp_normalize != "sum":  # (the other objectives' key: the SFT term has its own, with its own default)
            raise ValueError(f"logp_normalize: the sft term is normalized by its key normalize (now "
                             f"{self.normalize!r}); set normalize: {self.logp_normalize} instead")


def sft_loss(logps: PairLogps, hp: SFTHParams) -> LossOutput:
    chosen, _ = logps.policy(hp.normalize)
    return LossOutput(-chosen)


register_loss("sft", sft_loss, SFTHParams, reference_free=True)
