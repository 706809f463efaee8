"""The online merging optimizers as run components (``optim.name: ondare_adamw | onties_adamw``): each with its own
settings (spec ../methods/online-merging.md §10), the task vectors τ = θ_SFT − θ_base built from the two models by
parameter name and freed before training starts."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import torch

from .merging import MergingOptions, OnDAREAdamW, OnTIESAdamW, task_vectors_by_name
from .registry import OptimizerInputs, register_optimizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _MergingSettings:
    base_model: str | None = None  # θ_base of the task vector τ = θ_SFT − θ_base (any model the loader accepts)
    sft_model: str | None = None  # θ_SFT; null: model.name (the SFT model is the starting policy and reference)
    reserve_p: float = 0.01  # p: the kept fraction (DARE) or top-k share (TIES)
    alpha: float = 1e-7  # weight of the task vector in the merge
    merge: bool = True  # false: OnDARE is pure step dropout; OnTIES still elects δ̃ against τ̃
    online_step: int = 1  # K: merge every K-th step of a tensor
    alpha_schedule: str = field(default="constant", metadata={"choices": ("constant", "lr_ratio")})
    adam_formulation: str = field(default="reference", metadata={"choices": ("reference", "torch")})
    allow_low_precision_master: bool = False
    seed: int = 0
    # full_only: merge on every trainable tensor with a matching τ, adapter tensors get plain AdamW (the paper's
    # setting is full fine-tuning)
    adapter_mode: str = field(default="full_only", metadata={"choices": ("full_only",)})

    def __post_init__(self) -> None:
        if not self.base_model:
            raise ValueError("base_model: online merging needs the base model of the task vector (optim.base_model)")
        self.options()  # the optimizer's own checks (reserve_p, alpha, online_step, clip, rescale)

    def options(self) -> MergingOptions:
        names = {f.name for f in fields(MergingOptions)}
        return MergingOptions(**{f.name: getattr(self, f.name) for f in fields(self) if f.name in names})


@dataclass(frozen=True)
class OnDARESettings(_MergingSettings):
    clip: float = 1.0  # τ̃ clamped to ±clip (the reference's cap)
    # inverse_p (1/p on τ̃ and the kept step, as dropout scales), none (the paper's Eq. 4), l1 (the reference's
    # rescale flag: the kept step scaled to the whole step's L1 norm and clamped to ±clip)
    rescale: str = field(default="inverse_p", metadata={"choices": ("inverse_p", "none", "l1")})


@dataclass(frozen=True)
class OnTIESSettings(_MergingSettings):
    ties_election: str = field(default="unweighted", metadata={"choices": ("unweighted", "weighted")})
    rescale: str = field(default="none", metadata={"choices": ("none", "l1")})  # l1: the reference's flag


def _task_vectors(named: dict[str, torch.nn.Parameter], base_name: str, sft_name: str) -> dict:
    """τ = θ_SFT − θ_base for the policy's trainable tensors; both models are freed before training starts."""
    from ..models.loader import load_model

    base = load_model(base_name).state_dict()
    sft = load_model(sft_name).state_dict()
    taus = task_vectors_by_name(named.items(), base, sft)
    if not taus:
        raise ValueError(f"no trainable tensor of the policy matches a tensor of {sft_name}: adapter_mode full_only "
                         "merges full weights only (the paper's setting); use parametrization.kind=full")
    return taus


def _builder(cls):
    def build(inputs: OptimizerInputs, settings: _MergingSettings) -> torch.optim.Optimizer:
        taus = _task_vectors(inputs.named_parameters, settings.base_model, settings.sft_model or inputs.model_name)
        optimizer = cls(inputs.groups, taus, lr=inputs.lr, betas=inputs.betas, options=settings.options())
        log.info("optimizer %s: task vectors for %d of %d trainable tensors, %.1f MB held in the optimizer state "
                 "(p=%g, alpha=%g)", cls.__name__, len(taus), len(inputs.named_parameters),
                 optimizer.task_vector_bytes() / 2**20, settings.reserve_p, settings.alpha)
        return optimizer

    return build


register_optimizer("ondare_adamw", OnDARESettings, _builder(OnDAREAdamW))
register_optimizer("onties_adamw", OnTIESSettings, _builder(OnTIESAdamW))
