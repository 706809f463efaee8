"""A fast/slow pair of any parametrization (DoRA, RoPO, full fine-tuning, ...) for OFS-DPO.

Two copies of the model's module tree, each wrapped by the parametrization, that share every tensor both leave
frozen (the base weights of adapters: no second copy of them; full fine-tuning trains every weight, so its pair
holds two). Both start from the same trained tensors (``init_same``), so both policies equal the reference at step 0.
:class:`PairModule` holds the two as one module (one optimizer, one checkpoint: parameter names ``fast.…`` and
``slow.…``) and looks to the scorer like the causal LM of the module its route names; the reference is the fast
copy's (the base with its wrapper off, or full fine-tuning's frozen copy, shared by both). Each module runs its own
forward (the routed forward of both at once is the LoRA pair's, :class:`preflab.ofs.pair.FastSlowPair`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from ..adapters.base import Parametrization
from .pair import MODULES


class PairModule(nn.Module):
    """The two modules' networks; the scorer sees the one named by ``route`` (``fast`` or ``slow``)."""

    def __init__(self, fast: nn.Module, slow: nn.Module):
        super().__init__()
        self.fast, self.slow = fast, slow
        self.route = "fast"
        self.config = fast.config

    @property
    def routed_model(self) -> nn.Module:
        return self.fast if self.route == "fast" else self.slow

    def get_base_model(self) -> nn.Module:  # what the scorer runs: the routed module's causal LM
        model = self.routed_model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def forward(self, *args, **kwargs):
        return self.routed_model(*args, **kwargs)


def _set_parameter(root: nn.Module, name: str, value: nn.Parameter) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, value)


class ModulePair(Parametrization):
    fused = False

    def __init__(self, model: nn.Module, build: Callable[[nn.Module], Parametrization], init_same: bool = True):
        twin = copy.deepcopy(model)  # before wrapping: the slow module's tree (its frozen tensors shared below)
        self.modules = {"fast": build(model), "slow": build(twin)}
        fast, slow = self.modules["fast"], self.modules["slow"]
        frozen = {n: p for n, p in fast.model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        for name, p in list(slow.model.named_parameters(remove_duplicate=False)):
            shared = frozen.get(name)
            if not p.requires_grad and shared is not None and shared.shape == p.shape and shared.dtype == p.dtype:
                _set_parameter(slow.model, name, shared)
        slow.share_reference(fast)
        if init_same:
            slow.load_trainable_state_dict(fast.trainable_state_dict())
        self.count_convention = f"{fast.count_convention}, both modules"
        self.model = PairModule(fast.model, slow.model)

    # -- the fast/slow interface of OFS ---------------------------------------------------------------------

    def parameters(self, module: str) -> list[nn.Parameter]:
        return list(self.modules[module].trainable_parameters().values())

    @contextmanager
    def routed(self, mode: str, split: int = 0):
        """Within the block the model runs ``mode`` (``fast`` or ``slow``; ``off``: the reference)."""
        if mode not in MODULES:
            raise ValueError(f"a pair of {type(self.modules['fast']).__name__} runs one module per forward, not "
                             f"{mode!r} (set ofs.fused_forward=false)")
        before = self.model.route
        self.model.route = mode
        try:
            yield self.model
        finally:
            self.model.route = before

    def rest_on(self, module: str) -> None:
        self.model.route = module

    def follow(self, other: Parametrization) -> None:
        self.rest_on(other.resting)

    @property
    def resting(self) -> str:
        return self.model.route

    def save_module(self, module: str, out_dir: Path) -> None:
        """``module``'s trained tensors (``module.safetensors``)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = self.modules[module].trainable_state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, out_dir / "module.safetensors")

    def load_module(self, module: str, out_dir: Path) -> None:
        self.modules[module].load_trainable_state_dict(load_file(Path(out_dir) / "module.safetensors"))

    # -- the parametrization --------------------------------------------------------------------------------

    def place(self, device) -> None:
        for m in MODULES:
            self.modules[m].place(device)

    def reference(self):
        return self.modules["fast"].reference()

    def policy_module(self) -> nn.Module:
        return self.modules[self.resting].policy_module()

    def merged_model(self) -> nn.Module:
        return self.modules[self.resting].merged_model()

    def save_final(self, out_dir: Path) -> None:
        self.modules[self.resting].save_final(out_dir)


def build_pair(kind: str, params, model: nn.Module, init_same: bool = True) -> Parametrization:
    """The fast/slow pair of parametrization ``kind``: its own pair where it registered one (LoRA's routed pair),
    else two of it (:class:`ModulePair`)."""
    from ..adapters import parametrization_registry

    spec = parametrization_registry()[kind]
    if spec.pair is not None:
        return spec.pair(model, params, init_same)
    return ModulePair(model, lambda m: spec.build(m, params), init_same)
