"""Exact linear combinations of LoRA modules (COFS-DPO), and the simplex the combination weights live on.

A LoRA module changes a weight by ``ΔW = s·B·A``. Combining modules means combining these products; averaging
the factors separately is not that (``(½B₁ + ½B₂)(½A₁ + ½A₂)`` has cross terms ``B₁A₂``, ``B₂A₁``). The
concatenation ``A_cat = [A₁; A₂; …]`` (rows), ``B_cat = [c₁s₁B₁, c₂s₂B₂, …]`` (columns) gives
``B_cat·A_cat = Σ c_j s_j B_j A_j`` exactly, as one LoRA module of rank ``Σ r_j`` and scale 1.

On a live model, :class:`AtomMixture` holds the stored modules (atoms) and evaluates θ₀ + Σ c_k ΔW_k for any
coefficients (autograd through them for the projected-gradient search); :func:`fold_into` writes a combination
into dense weights and :func:`save_concat_adapter` exports it as one PEFT adapter.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


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


# -- stored modules on a live model ---------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def read_lora_adapter(path: str | Path) -> dict[str, LoraAtom]:
    """A PEFT LoRA adapter directory as one atom per targeted layer (layer path → factors and scale)."""
    path = Path(path)
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(path / "adapter_model.safetensors")
    r, alpha = config["r"], config["lora_alpha"]
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    atoms = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            layer = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
            atoms[layer] = LoraAtom(a.float(), tensors[key.replace(".lora_A.", ".lora_B.")].float(), scale)
    if not atoms:
        raise ValueError(f"{path}: no LoRA factors in adapter_model.safetensors")
    return atoms


class AtomLinear(nn.Module):
    """A frozen Linear plus ``Σ_k c_k s_k B_k A_k`` over stored atoms, the coefficients read from a shared
    :class:`AtomMixture` (one concatenated rank-Σr product: ``((x A_catᵀ) ⊙ col) B_catᵀ``)."""

    def __init__(self, base: nn.Linear, atoms: list[LoraAtom], mixture: AtomMixture):
        super().__init__()
        self.base, self.mixture = base, mixture
        w = base.weight
        self.register_buffer("A", torch.cat([a.A for a in atoms]).to(w.device, w.dtype), persistent=False)
        self.register_buffer("B", torch.cat([a.scale * a.B for a in atoms], dim=1).to(w.device, w.dtype),
                             persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        col = self.mixture.columns
        if col is None:
            return y
        return y + ((x @ self.A.T) * col.to(x.dtype)) @ self.B.T


class AtomMixture:
    """The model θ₀ + Σ_k c_k ΔW_k for stored LoRA modules (atoms) k, with ``c`` set per call: the policy of
    COFS-DPO's weight search. ``set(None)`` gives θ₀ itself (the search's reference)."""

    def __init__(self, model: nn.Module, modules: list[dict[str, LoraAtom]]):
        self.model = model.requires_grad_(False)
        layers = sorted(modules[0])
        for i, m in enumerate(modules[1:], 2):
            if sorted(m) != layers:
                raise ValueError(f"module {i} targets other layers than module 1")
        ranks = [modules[0][layers[0]].A.shape[0]]
        for m in modules[1:]:
            ranks.append(m[layers[0]].A.shape[0])
        self.ranks = torch.tensor(ranks)
        self.columns: Tensor | None = None
        for name in layers:
            model.set_submodule(name, AtomLinear(model.get_submodule(name), [m[name] for m in modules], self))

    def set(self, coeffs: Tensor | None) -> None:
        """One coefficient per atom (a tensor that may require grad), or None for the base alone."""
        self.columns = None if coeffs is None else torch.repeat_interleave(coeffs, self.ranks.to(coeffs.device))


def fold_into(model: nn.Module, modules: list[dict[str, LoraAtom]], coeffs: list[float]) -> None:
    """Adds ``Σ_k c_k s_k B_k A_k`` to each targeted weight of a plain model, in place (fp32 products)."""
    with torch.no_grad():
        for name in modules[0]:
            weight = model.get_submodule(name).weight
            delta = sum(c * m[name].delta() for m, c in zip(modules, coeffs) if c != 0)
            if isinstance(delta, Tensor):
                weight += delta.to(weight.device)  # summed in fp32, rounded once to the weight's dtype


def save_concat_adapter(modules: list[dict[str, LoraAtom]], coeffs: list[float], out_dir: str | Path,
                        base_name: str | None) -> int:
    """The combination as one PEFT LoRA adapter (r = lora_alpha = Σ r_k over the nonzero weights, so its scale is
    1); returns that rank."""
    tensors, rank = {}, 0
    for name in modules[0]:
        A, B = concat_lora([m[name] for m in modules], coeffs)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous()
        rank = A.shape[0]
    if rank == 0:
        raise ValueError("every combination weight is 0: nothing to export")
    write_peft_lora(tensors, rank, rank, list(modules[0]), base_name, out_dir)
    return rank


def write_peft_lora(tensors: dict[str, Tensor], r: int, alpha: float, layers: list[str], base_name: str | None,
                    out_dir: str | Path, dropout: float = 0.0) -> None:
    """A PEFT LoRA adapter directory (``adapter_model.safetensors`` under PEFT's names, ``adapter_config.json``)
    that plain ``peft`` loads onto the base model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in tensors.items()}, out_dir / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "target_modules": sorted({n.rsplit(".", 1)[-1] for n in layers}),
              "base_model_name_or_path": base_name, "inference_mode": True}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
