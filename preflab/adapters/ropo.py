"""RoPO: rotate the inputs of a frozen ``nn.Linear`` and rescale its neurons (Yang et al., arXiv 2409.14836).

A targeted layer computes ``y = F.linear(x @ R, W) * (m / r) + b`` with W, b frozen, ``r = ‖W‖_row`` and
trainable magnitudes ``m`` (init r) and an orthogonal ``R`` (init I). The equivalent weight is
``W' = diag(m / r) · W · Rᵀ``: every neuron is rotated by the same R and rescaled, so the angles between
neurons, and the hyperspherical energy, stay fixed.

R is a product of factors ``R_1 ⋯ R_F``; factor ``(b, s)`` cuts the inputs into windows of ``b·s`` indices,
and inside window w group j = {w·b·s + j + t·s : t < b} gets its own b×b Cayley rotation
``(I + Q)(I − Q)⁻¹`` with ``Q`` skew-symmetric (b(b−1)/2 free parameters). ``[(b, 1)]`` is block-diagonal
OFT, ``[(2,1), (2,2), (2,4), …]`` a butterfly, any mix is "multi-granularity".

Every update is applied in residual form (``x + x·(R_f − I)``, ``z + (z − b)·(m/r − 1)``), whose added
terms are exactly zero at the start: the untrained policy computes the reference bit for bit. The
reference is the same network with the wrappers switched off.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .base import Parametrization, register_parametrization

STATE_FILE, CONFIG_FILE = "ropo.safetensors", "ropo.json"


@dataclass(frozen=True)
class RopoParams:
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # module names, or all-linear (every Linear but the head)
    factors: tuple[tuple[int, int], ...] = ((2, 1), (2, 2), (2, 4), (2, 8))  # (block b, stride s), in order
    magnitude: str = field(default="absolute", metadata={"choices": ("absolute", "relative", "none")})
    magnitude_param: str = field(default="linear", metadata={"choices": ("linear", "log")})
    cayley: str = field(default="exact", metadata={"choices": ("exact", "neumann")})
    neumann_terms: int = 5

    def __post_init__(self) -> None:
        if not self.target_modules:
            raise ValueError("target_modules: must name at least one module (or all-linear)")
        if not self.factors:
            raise ValueError("factors: must hold at least one (block size, stride) factor")
        for b, s in self.factors:
            if b < 2 or s < 1:
                raise ValueError(f"factors: block size must be >= 2 and stride >= 1, got ({b}, {s})")
        if self.neumann_terms < 1:
            raise ValueError(f"neumann_terms: must be >= 1, got {self.neumann_terms}")


def _skew(params: Tensor, b: int) -> Tensor:
    """``(G, b(b−1)/2)`` free parameters → ``(G, b, b)`` skew-symmetric Q = U − Uᵀ."""
    rows, cols = torch.triu_indices(b, b, offset=1, device=params.device)
    upper = params.new_zeros(params.shape[0], b, b)
    upper[:, rows, cols] = params
    return upper - upper.transpose(-1, -2)


def cayley_minus_identity(params: Tensor, b: int, neumann_terms: int | None = None) -> Tensor:
    """``R − I = 2Q(I − Q)⁻¹`` per block (exact solve), or with ``(I − Q)⁻¹ ≈ Σ_{k<n} Qᵏ`` (only ≈ orthogonal)."""
    q = _skew(params, b)
    eye = torch.eye(b, dtype=q.dtype, device=q.device)
    if neumann_terms is None:
        return torch.linalg.solve(eye - q, 2 * q, left=False)
    series, power = eye.expand_as(q), eye.expand_as(q)
    for _ in range(neumann_terms - 1):
        power = power @ q
        series = series + power
    return 2 * q @ series


def apply_factor(x: Tensor, deltas: Tensor, b: int, s: int) -> Tensor:
    """``x @ R_f`` for one factor given its blocks ``R − I`` as ``(W·s, b, b)``; x is ``(..., in)``."""
    lead, width = x.shape[:-1], x.shape[-1]
    windows = width // (b * s)
    xr = x.reshape(*lead, windows, b, s).transpose(-1, -2)  # (..., W, s, b): group j of window w
    rotated = torch.einsum("...wsb,wsbc->...wsc", xr, deltas.view(windows, s, b, b).to(x.dtype))
    return x + rotated.transpose(-1, -2).reshape(*lead, width)


def _exact(t: Tensor) -> Tensor:
    """fp32 for half-precision tensors, else unchanged (fp64 stays fp64)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_width(params: RopoParams, width: int, layer: str) -> None:
    for b, s in params.factors:
        if width % (b * s):
            raise ValueError(f"factors: factor ({b}, {s}) needs in_features divisible by {b * s}; "
                             f"{layer} has in_features={width}")


def check_layers(model: nn.Module, params: RopoParams) -> None:
    """Every targeted layer's width against the factors (run on the model's skeleton before any work)."""
    for name in _targets(model, params.target_modules):
        _check_width(params, model.get_submodule(name).in_features, f"layer {name}")


class RopoLinear(nn.Module):
    """A frozen ``nn.Linear`` (``base``) with a trainable input rotation and per-neuron magnitude."""

    def __init__(self, base: nn.Linear, params: RopoParams):
        super().__init__()
        self.base, self.config, self.enabled = base, params, True
        self._cache: tuple | None = None
        width, out = base.in_features, base.out_features
        _check_width(params, width, "a targeted layer")
        # fp32 trainables whatever the base dtype: Adam's tiny steps survive, the deltas are cast per forward
        self.rotation = nn.ParameterList(
            nn.Parameter(torch.zeros(width // b, b * (b - 1) // 2, device=base.weight.device))
            for b, _ in params.factors)
        self.register_buffer("row_norm", _exact(base.weight.detach()).norm(dim=1), persistent=True)
        self.magnitude = None
        if params.magnitude != "none":
            start = self.row_norm.clone() if params.magnitude == "absolute" and params.magnitude_param == "linear" \
                else torch.zeros(out) if params.magnitude_param == "log" else torch.ones(out)
            self.magnitude = nn.Parameter(start.to(base.weight.device))

    def rotation_deltas(self) -> list[Tensor]:
        """``R_f − I`` per factor. Without autograd (generation, evaluation) they are cached until a parameter
        changes: decoding calls every layer once per token, and the batched solves would dominate."""
        key = tuple((p._version, p.data_ptr()) for p in self.rotation)
        if not torch.is_grad_enabled() and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        terms = self.config.neumann_terms if self.config.cayley == "neumann" else None
        deltas = [cayley_minus_identity(p, b, terms) for p, (b, _) in zip(self.rotation, self.config.factors)]
        self._cache = None if torch.is_grad_enabled() else (key, deltas)
        return deltas

    def scale_minus_one(self) -> Tensor | None:
        """``m/r − 1`` per output neuron, exactly zero at the start."""
        if self.magnitude is None:
            return None
        if self.config.magnitude_param == "log":  # log(m/r): the same function for absolute and relative
            return torch.expm1(self.magnitude)
        if self.config.magnitude == "absolute":
            return (self.magnitude - self.row_norm) / self.row_norm
        return self.magnitude - 1

    def rotate(self, x: Tensor) -> Tensor:
        for deltas, (b, s) in zip(self.rotation_deltas(), self.config.factors):
            x = apply_factor(x, deltas, b, s)
        return x

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self.base(x)
        z = self.base(self.rotate(x))
        scale = self.scale_minus_one()
        if scale is None:
            return z
        unbiased = z if self.base.bias is None else z - self.base.bias
        return z + unbiased * scale.to(z.dtype)

    def merged_weight(self) -> Tensor:
        """``W' = diag(m/r) · W · Rᵀ`` in fp32 (fp64 for an fp64 layer)."""
        with torch.no_grad():
            weight = _exact(self.base.weight)
            rotation = self.rotate(torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device))  # I·R = R
            merged = weight @ rotation.T
            scale = self.scale_minus_one()
            return merged if scale is None else merged * (1 + scale)[:, None]


def _targets(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
             and (names == ("all-linear",) or n.rsplit(".", 1)[-1] in names)]
    if not found:
        raise ValueError(f"target_modules: no nn.Linear named {list(names)} in {type(model).__name__}")
    return found


class Ropo(Parametrization):
    count_convention = "free parameters: b(b-1)/2 per b x b Cayley block (PEFT OFT's count; BOFT stores b^2)"

    def __init__(self, model: nn.Module, params: RopoParams):
        self.params = params
        self.model = model.requires_grad_(False)
        self.layers: dict[str, RopoLinear] = {}
        for name in _targets(model, params.target_modules):
            layer = RopoLinear(model.get_submodule(name), params)
            model.set_submodule(name, layer)
            self.layers[name] = layer

    @contextmanager
    def reference(self):
        for layer in self.layers.values():
            layer.enabled = False
        try:
            yield self.model
        finally:
            for layer in self.layers.values():
                layer.enabled = True

    def trainable_count_formula(self) -> int:
        """``Σ_layers out·[magnitude] + Σ_f in·(b_f − 1)/2``: free parameters (OFT's convention, not BOFT's b²)."""
        mag = self.params.magnitude != "none"
        return sum(layer.base.out_features * mag + sum(layer.base.in_features * (b - 1) // 2
                                                       for b, _ in self.params.factors)
                   for layer in self.layers.values())

    def merged_model(self) -> nn.Module:
        """A copy of the policy with every wrapper replaced by a plain ``nn.Linear`` holding W'."""
        merged = copy.deepcopy(self.model)
        for name, layer in self.layers.items():
            base = layer.base
            plain = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                              device=base.weight.device, dtype=base.weight.dtype)
            with torch.no_grad():
                plain.weight.copy_(layer.merged_weight().to(base.weight.dtype))
                if base.bias is not None:
                    plain.bias.copy_(base.bias)
            merged.set_submodule(name, plain.requires_grad_(False))
        return merged

    def save_final(self, out_dir: Path) -> None:
        """The merged model (plain ``transformers``), plus the small RoPO state to resume or re-merge."""
        self.merged_model().save_pretrained(out_dir)
        save_file({n: t.detach().contiguous().cpu() for n, t in self.trainable_state_dict().items()},
                  str(Path(out_dir) / STATE_FILE))
        (Path(out_dir) / CONFIG_FILE).write_text(json.dumps(
            {**asdict(self.params), "layers": list(self.layers)}, indent=2))


register_parametrization("ropo", RopoParams, Ropo, check=check_layers)
