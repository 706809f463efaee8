"""Exact linear combinations of LoRA modules (COFS-DPO), and the simplex the combination weights live on.

A LoRA module changes a weight by ``ΔW = s·B·A``. Combining modules means combining these products; averaging
the factors separately is not that (``(½B₁ + ½B₂)(½A₁ + ½A₂)`` has cross terms ``B₁A₂``, ``B₂A₁``). The
concatenation ``A_cat = [A₁; A₂; …]`` (rows), ``B_cat = [c₁s₁B₁, c₂s₂B₂, …]`` (columns) gives
``B_cat·A_cat = Σ c_j s_j B_j A_j`` exactly, as one LoRA module of rank ``Σ r_j`` and scale 1.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LoraAtom:
    """One LoRA module's factors on one weight: ``ΔW = scale · B @ A`` with ``A (r, in)``, ``B (out, r)``."""

    A: Tensor
    B: Tensor
    scale: float

    def delta(self) -> Tensor:
        return self.scale * self.B @ self.A


def concat_lora(atoms: list[LoraAtom], coeffs: list[float]) -> tuple[Tensor, Tensor]:
    """``(A_cat, B_cat)`` with ``B_cat @ A_cat = Σ c_j s_j B_j A_j`` exactly; atoms of weight 0 are dropped (so
    weights (1, 0, …) give back the first module's factors, scaled)."""
    if len(atoms) != len(coeffs):
        raise ValueError(f"{len(atoms)} modules but {len(coeffs)} weights")
    kept = [(a, c) for a, c in zip(atoms, coeffs) if c != 0]
    if not kept:
        a = atoms[0]
        return a.A.new_zeros(0, a.A.shape[1]), a.B.new_zeros(a.B.shape[0], 0)
    return torch.cat([a.A for a, _ in kept], dim=0), torch.cat([c * a.scale * a.B for a, c in kept], dim=1)


def naive_factor_average(atoms: list[LoraAtom], coeffs: list[float]) -> Tensor:
    """What averaging A and B separately gives (PEFT's ``combination_type="linear"``): wrong, kept to show it."""
    A = sum(c * a.A for a, c in zip(atoms, coeffs))
    B = sum(c * a.scale * a.B for a, c in zip(atoms, coeffs))
    return B @ A


def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection onto {w ≥ 0, Σw = 1} (sort-based)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, dim=0)
    j = torch.arange(1, len(v) + 1, dtype=v.dtype, device=v.device)
    rho = int(torch.nonzero(u - (css - 1) / j > 0).max()) + 1
    theta = (css[rho - 1] - 1) / rho
    return torch.clamp(v - theta, min=0)


def simplex_grid(d: int, step: float) -> list[tuple[float, ...]]:
    """Every weight vector of ``d`` entries, multiples of ``step`` (which must divide 1), summing to 1."""
    n = round(1 / step)
    if abs(n * step - 1) > 1e-9:
        raise ValueError(f"grid_step must divide 1, got {step}")
    return [tuple(k / n for k in ks) for ks in itertools.product(range(n + 1), repeat=d) if sum(ks) == n]
