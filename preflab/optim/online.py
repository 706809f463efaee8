"""The online merging optimizers as run components (``optim.name: ondare_adamw | onties_adamw``): each with its own
settings (spec ../methods/online-merging.md §10), the task vectors built by parameter name and the models they come
from freed before training starts.

``adapter_mode`` (spec §8): ``full_only`` merges every trained tensor that θ_SFT and θ_base hold, τ = θ_SFT − θ_base
(the paper's setting: full fine-tuning). ``adapter_space``: θ_SFT was itself a LoRA adapter φ_SFT on the base, the run
continues training it (``parametrization.init_adapter``), and τ = φ_SFT − φ_init over the adapter's own tensors —
the merge happens in factor space, which is not merging ΔW = sBA. φ_init is the SFT adapter's initial factors: B = 0
(the spec's reading); A's (and DoRA's magnitude's) initial values are not kept by an adapter, so they are read from
``adapter_init`` (an adapter directory saved before SFT) or, without it, taken as unknown: τ = 0 there, and those
tensors take the sparsified step alone."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from .merging import MergingOptions, OnDAREAdamW, OnTIESAdamW, match_name, task_vectors_by_name
from .registry import OptimizerInputs, register_optimizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _MergingSettings:
    base_model: str | None = None  # θ_base of the task vector τ = θ_SFT − θ_base (any model the loader accepts)
    # θ_SFT; null: model.name (the SFT model is the starting policy and reference). adapter_space: the SFT adapter's
    # directory; null: parametrization.init_adapter
    sft_model: str | None = None
    reserve_p: float = 0.01  # p: the kept fraction (DARE) or top-k share (TIES)
    alpha: float = 1e-7  # weight of the task vector in the merge
    merge: bool = True  # false: OnDARE is pure step dropout; OnTIES still elects δ̃ against τ̃
    online_step: int = 1  # K: merge every K-th step of a tensor
    alpha_schedule: str = field(default="constant", metadata={"choices": ("constant", "lr_ratio")})
    adam_formulation: str = field(default="reference", metadata={"choices": ("reference", "torch")})
    allow_low_precision_master: bool = False
    seed: int = 0
    # full_only: merge on every trainable tensor with a matching τ, adapter tensors get plain AdamW (the paper's
    # setting is full fine-tuning); adapter_space: τ = φ_SFT − φ_init over the continued adapter's tensors
    adapter_mode: str = field(default="full_only", metadata={"choices": ("full_only", "adapter_space")})
    adapter_init: str | None = None  # adapter_space: the SFT adapter's initial factors (a PEFT adapter directory)

    def __post_init__(self) -> None:
        if self.adapter_mode == "full_only":
            if not self.base_model:
                raise ValueError("base_model: online merging needs the base model of the task vector "
                                 "(optim.base_model)")
            if self.adapter_init:
                raise ValueError("adapter_init: only adapter_mode adapter_space reads it")
        elif self.base_model:
            raise ValueError("base_model: adapter_mode adapter_space takes τ = φ_SFT − φ_init over the adapter "
                             "(optim.sft_model, optim.adapter_init); θ_base is not read: remove optim.base_model")
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


def _adapter_tensors(directory: str, role: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(directory) / "adapter_model.safetensors"
    if not path.is_file():
        raise ValueError(f"{role}: {directory} holds no adapter_model.safetensors (adapter_mode adapter_space reads a "
                         "PEFT adapter directory)")
    return load_file(path)


def adapter_task_vectors(named: dict[str, torch.nn.Parameter], sft: dict[str, torch.Tensor],
                         init: dict[str, torch.Tensor] | None) -> dict:
    """τ = φ_SFT − φ_init for the policy's adapter tensors, matched by name without PEFT's adapter name
    (``…lora_A.default.weight`` is the saved ``…lora_A.weight``). Without ``init``, B's start is 0 and the other
    tensors' start is unknown: τ = 0 there."""
    out = {}
    for name, param in named.items():
        key = match_name(name.replace(".default.", "."), sft)
        if key is None or not param.requires_grad:
            continue
        if sft[key].shape != param.shape:
            raise ValueError(f"task vector: {key} has shape {tuple(sft[key].shape)} in the SFT adapter, "
                             f"{tuple(param.shape)} in the policy")
        if init is not None:
            if key not in init:
                raise ValueError(f"adapter_init: {key} is in the SFT adapter but not in adapter_init")
            start = init[key].float()
        else:
            start = torch.zeros_like(sft[key], dtype=torch.float32) if "lora_B" in key else sft[key].float()
        out[param] = sft[key].float() - start
    return out


def _task_vectors_for(inputs: OptimizerInputs, settings: _MergingSettings) -> dict:
    if settings.adapter_mode == "full_only":
        return _task_vectors(inputs.named_parameters, settings.base_model, settings.sft_model or inputs.model_name)
    sft_dir = settings.sft_model or inputs.start_adapter
    if not sft_dir:
        raise ValueError("adapter_mode adapter_space: the run continues training an SFT adapter: set "
                         "parametrization.init_adapter (and optim.sft_model where θ_SFT is another adapter)")
    init = _adapter_tensors(settings.adapter_init, "adapter_init") if settings.adapter_init else None
    taus = adapter_task_vectors(inputs.named_parameters, _adapter_tensors(sft_dir, "sft_model"), init)
    if not taus:
        raise ValueError(f"adapter_mode adapter_space: no trainable tensor of the policy is a tensor of the SFT "
                         f"adapter {sft_dir}")
    if init is None:
        log.info("adapter_space without adapter_init: τ = φ_SFT − 0 on lora_B, τ = 0 on the other adapter tensors")
    return taus


def _builder(cls):
    def build(inputs: OptimizerInputs, settings: _MergingSettings) -> torch.optim.Optimizer:
        taus = _task_vectors_for(inputs, settings)
        optimizer = cls(inputs.groups, taus, lr=inputs.lr, betas=inputs.betas, options=settings.options())
        log.info("optimizer %s: task vectors for %d of %d trainable tensors, %.1f MB held in the optimizer state "
                 "(p=%g, alpha=%g)", cls.__name__, len(taus), len(inputs.named_parameters),
                 optimizer.task_vector_bytes() / 2**20, settings.reserve_p, settings.alpha)
        return optimizer

    return build


register_optimizer("ondare_adamw", OnDARESettings, _builder(OnDAREAdamW))
register_optimizer("onties_adamw", OnTIESSettings, _builder(OnTIESAdamW))
