"""Exact linear combinations of modules of any parametrization through their dense weight changes (COFS-DPO, spec
ofs-cofs.md §2 option (a)): a module is ΔW = W' − W per tensor it changed (its merged model minus the model it
started from), and a combination θ₀ + Σ_k c_k ΔW_k is exact for any parametrization (RoPO, DoRA, full fine-tuning).

:class:`DenseMixture` evaluates θ₀ + Σ c_k ΔW_k on a live model for any coefficients, with autograd through them
(the projected-gradient search), as :class:`preflab.ofs.combine.AtomMixture` does for LoRA factors; :func:`fold_dense`
writes a combination into the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.utils import parametrize

DELTA_FILE = "delta.safetensors"


def dense_delta(trained: nn.Module, start: nn.Module) -> dict[str, Tensor]:
    """W' − W (fp32) for every parameter the two plain models hold under one name and that changed."""
    before = dict(start.named_parameters())
    out = {}
    for name, param in trained.named_parameters():
        if name in before and param.is_floating_point():
            delta = param.detach().float().cpu() - before[name].detach().float().cpu()
            if delta.any():
                out[name] = delta
    return out


def save_delta(delta: dict[str, Tensor], out_dir: str | Path) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in delta.items()}, Path(out_dir) / DELTA_FILE)


def read_delta(out_dir: str | Path) -> dict[str, Tensor]:
    return load_file(Path(out_dir) / DELTA_FILE)


class _Mixed(nn.Module):
    """The parametrization ``W₀ + Σ_k c_k ΔW_k`` of one tensor, the coefficients read from the shared mixture."""

    def __init__(self, deltas: Tensor, mixture: DenseMixture):
        super().__init__()
        self.register_buffer("deltas", deltas, persistent=False)  # (K, *shape)
        self.mixture = mixture

    def forward(self, original: Tensor) -> Tensor:
        coeffs = self.mixture.coeffs
        if coeffs is None:
            return original
        return original + torch.tensordot(coeffs.to(original.dtype), self.deltas, dims=1)


class DenseMixture:
    """The model θ₀ + Σ_k c_k ΔW_k for stored dense modules k, with ``c`` set per call; ``set(None)``: θ₀."""

    def __init__(self, model: nn.Module, modules: list[dict[str, Tensor]]):
        self.model = model.requires_grad_(False)
        self.coeffs: Tensor | None = None
        names = sorted(set().union(*modules))
        holders = {}  # every (module, attribute) that holds a tensor (a tied tensor: several)
        for name, param in model.named_parameters(remove_duplicate=False):
            holders.setdefault(id(param), []).append(name)
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"the stored modules change tensors the model does not hold: {missing[:3]}")
        for name in names:
            param = params[name]
            deltas = torch.stack([m[name] if name in m else torch.zeros(param.shape) for m in modules])
            deltas = deltas.to(param.device, param.dtype)
            for holder in holders[id(param)]:
                parent, _, leaf = holder.rpartition(".")
                parametrize.register_parametrization(model.get_submodule(parent) if parent else model, leaf,
                                                     _Mixed(deltas, self), unsafe=True)

    def set(self, coeffs: Tensor | None) -> None:
        """One coefficient per module (a tensor that may require grad), or None for the base alone."""
        self.coeffs = coeffs


def fold_dense(model: nn.Module, modules: list[dict[str, Tensor]], coeffs: list[float]) -> None:
    """Adds ``Σ_k c_k ΔW_k`` to the tensors of a plain model, in place (a tied tensor once)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in sorted(set().union(*modules)):
            weight = params[name]
            delta = sum(c * m[name] for m, c in zip(modules, coeffs) if c != 0 and name in m)
            if isinstance(delta, Tensor):
                weight += delta.to(weight.device)  # summed in fp32, rounded once to the weight's dtype
