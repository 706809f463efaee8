"""The interface every parametrization implements, and its registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models.shards import copy_whole_


class Parametrization(ABC):
    """A policy built from a base model. ``model`` is what the optimizer trains and the scorer runs."""

    model: nn.Module
    starts_at_reference: bool = True  # the untrained policy computes the reference's function
    count_convention: str = "stored trainable tensor elements"  # what the printed trainable count counts

    def place(self, device: torch.device) -> None:
        """Move everything the parametrization owns (policy and any reference copy) to a device."""
        self.model.to(device)

    def policy_module(self) -> nn.Module:
        """The module whose forward is the policy (what weight diagnostics read); ``model`` but for pairs."""
        return self.model

    def follow(self, other: Parametrization) -> None:  # noqa: B027  (only pairs route)
        """Run what ``other`` (the same kind, on another copy of the model) runs: a pair rests on its module."""

    def share_reference(self, other: Parametrization) -> None:  # noqa: B027  (most kinds hold no copy)
        """Use ``other``'s reference where this one holds a copy of its own (two of one kind on one model)."""

    @abstractmethod
    def reference(self) -> AbstractContextManager[nn.Module]:
        """Context yielding the module whose forward is the reference policy (run it under no_grad)."""

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters that training changes, by name (the objects themselves: a distributed engine's shards)."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors that training changes, by parameter name: what a checkpoint must hold."""
        return {n: p.detach() for n, p in self.trainable_parameters().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in state]
        unknown = [n for n in state if n not in params]
        if missing or unknown:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unknown[:3]}")
        with torch.no_grad():  # whole tensors: a sharded engine's parameters take their shards of them
            for name, value in state.items():
                copy_whole_(params[name], value)

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts of the policy (shared tied weights counted once)."""
        seen, trainable, total = set(), 0, 0
        for p in self.model.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            n = getattr(p, "ds_numel", p.numel())  # a DeepSpeed ZeRO-3 partitioned parameter holds no data
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    @abstractmethod
    def merged_model(self) -> nn.Module:
        """The policy as a plain ``transformers`` model with dense weights (no wrappers, no adapter). It may be the
        policy itself (full fine-tuning) or a copy: writing into it may change the policy."""

    @abstractmethod
    def save_final(self, out_dir: Path) -> None:
        """Write the trained policy in Hugging Face format (a PEFT adapter or a full model)."""


@dataclass(frozen=True)
class ParametrizationSpec:
    kind: str
    params: type  # frozen dataclass of the kind's options
    build: Callable[[nn.Module, object], Parametrization]
    # a fast/slow pair of its own for OFS-DPO (model, params, init_same); None: two of it (preflab.ofs.module_pair)
    pair: Callable[[nn.Module, object, bool], Parametrization] | None = None
    # the settings checked against the model's layers before any work (on its skeleton: the meta device, no
    # weights); raises ValueError("field: ... naming the layer")
    check: Callable[[nn.Module, object], None] | None = None


_REGISTRY: dict[str, ParametrizationSpec] = {}


def register_parametrization(kind: str, params: type, build: Callable[[nn.Module, object], Parametrization],
                             pair: Callable[[nn.Module, object, bool], Parametrization] | None = None,
                             check: Callable[[nn.Module, object], None] | None = None) -> None:
    if kind in _REGISTRY:
        raise ValueError(f"parametrization {kind!r} registered twice")
    _REGISTRY[kind] = ParametrizationSpec(kind, params, build, pair, check)


def check_parametrization(model_name: str, component) -> None:
    """The parametrization's settings against the layers of ``model_name``, before any work: a
    :class:`~preflab.config_tree.ConfigError` naming the key and the layer. Skipped where the model's config cannot
    be read yet (a hub id offline: loading it names the problem)."""
    from ..config_tree import ConfigError
    from ..models.loader import skeleton

    spec = _REGISTRY[component.name]
    if spec.check is None:
        return
    model = skeleton(model_name)
    if model is None:
        return
    try:
        spec.check(model, component.params)
    except ValueError as e:
        raise ConfigError(f"parametrization.{e}") from None


def parametrization_registry() -> dict[str, ParametrizationSpec]:
    return dict(_REGISTRY)
