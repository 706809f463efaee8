"""Hyperspherical energy (HE) of weight matrices, and its drift during a run, for any parametrization.

``HE(W) = Σ_{i≠j} ‖ŵ_i − ŵ_j‖⁻¹`` over the unit rows (neurons) ŵ_i of W, ordered pairs. RoPO keeps it fixed
by construction (a shared rotation and per-neuron scales keep every angle); full fine-tuning, LoRA and DoRA
move it. The weight a layer *computes with* is read off the forward of an fp64 copy: ``W_eff = (layer(I) − layer(0))ᵀ``,
so the same code measures a plain Linear, a PEFT LoRA/DoRA layer and a RoPO wrapper.

Logged under ``he/``: ``he/drift_mean`` and ``he/drift_max`` (|HE_t − HE_0| / HE_0 over the monitored
layers), ``he/normalized_mean`` (HE / (n(n−1)), comparable across layer shapes; the paper does not say how it
normalises) and ``he/drift/<layer>`` per layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn


def hyperspherical_energy(weight: Tensor, chunk: int = 1024, eps: float = 1e-12) -> Tensor:
    """HE of the rows of ``weight`` (n, d), in float64, computed ``chunk`` rows at a time (memory O(chunk·n))."""
    w = weight.detach()
    w = w.float() if w.dtype in (torch.float16, torch.bfloat16) else w
    unit = w / w.norm(dim=1, keepdim=True)
    n = unit.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=w.device)
    for start in range(0, n, chunk):
        block = (2 - 2 * unit[start:start + chunk] @ unit.T).clamp_min(eps)  # (c, n) squared distances
        rows = torch.arange(start, min(start + chunk, n), device=w.device)
        block[rows - start, rows] = float("inf")  # drop i == j
        total += block.rsqrt().sum(dtype=torch.float64)
    return total


@torch.no_grad()
def effective_weight(layer: nn.Module, in_features: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The (out, in) matrix a linear-acting module applies, read off the forward of an fp64 copy of it.

    fp64 keeps the read-off error (~1e-16) far below the drifts being measured: a rank-16 LoRA moves the HE
    of a 576-wide layer by ~1e-6 relative, about the size of an fp32 read-off's own error.
    """
    probe = copy.deepcopy(layer).to(dtype)
    eye = torch.eye(in_features, dtype=dtype, device=next(layer.parameters()).device)
    return (probe(eye) - probe(torch.zeros_like(eye[:1]))).T


def _in_features(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    base = getattr(module, "base_layer", None) or getattr(module, "base", None)  # PEFT layers, RoPO
    return base.in_features if isinstance(base, nn.Linear) else None


def monitored_layers(model: nn.Module, names: tuple[str, ...]) -> dict[str, tuple[nn.Module, int]]:
    """Outermost modules whose last name is in ``names`` and act linearly: name (PEFT prefix dropped) → (module, in)."""
    found: dict[str, tuple[nn.Module, int]] = {}
    for full_name, module in model.named_modules():
        if full_name.rsplit(".", 1)[-1] not in names or any(full_name.startswith(k + ".") for k in found):
            continue
        width = _in_features(module)
        if width is not None:
            found[full_name] = (module, width)
    return {name.removeprefix("base_model.model."): value for name, value in found.items()}


class EnergyMonitor:
    """HE of fixed layers at the reference (once) and of the policy (on demand)."""

    def __init__(self, module_names: tuple[str, ...], chunk: int = 1024):
        self.module_names, self.chunk = module_names, chunk
        self.reference: dict[str, float] = {}

    def _energies(self, model: nn.Module) -> dict[str, tuple[float, int]]:
        was_training = model.training
        model.eval()
        try:
            out = {}
            for name, (layer, width) in monitored_layers(model, self.module_names).items():
                weight = effective_weight(layer, width)
                out[name] = (hyperspherical_energy(weight, self.chunk).item(), weight.shape[0])
            return out
        finally:
            model.train(was_training)

    def prepare(self, reference: Callable[[], AbstractContextManager[nn.Module]]) -> None:
        with reference() as ref:
            self.reference = {name: he for name, (he, _) in self._energies(ref).items()}
        if not self.reference:
            raise ValueError(f"diag.he_modules: no linear layer named {list(self.module_names)} in the model")

    def measure(self, policy: nn.Module) -> dict[str, float]:
        energies = self._energies(policy)
        drift = {name: abs(he - self.reference[name]) / self.reference[name] for name, (he, _) in energies.items()}
        out = {"he/drift_mean": sum(drift.values()) / len(drift), "he/drift_max": max(drift.values()),
               "he/normalized_mean": sum(he / (n * (n - 1)) for he, n in energies.values()) / len(energies)}
        out.update({f"he/drift/{name}": value for name, value in drift.items()})
        return out
