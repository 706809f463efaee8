"""Two LoRA modules on one frozen base, routed by rows: the fast/slow pair of OFS-DPO in one forward.

Every targeted ``nn.Linear`` becomes a :class:`TwoLoraLinear` holding the frozen base weight and two LoRA modules,
``fast`` and ``slow`` (``ΔW_k = (α/r)·B_k·A_k``, PEFT's initialisation: A Kaiming-uniform, B = 0; with
``init_same`` both start from the same A, so both policies equal the reference at step 0). A shared
:class:`Route` says what a forward computes:

- ``off``: the base alone (the reference, no copy of the model);
- ``fast`` / ``slow``: the base plus one module;
- ``split`` at row ``h``: rows ``[0, h)`` through fast, rows ``[h, R)`` through slow — one forward for both
  modules on a duplicated batch (:func:`duplicate_rows`), larger GEMMs, one backward. The two modules act as
  one rank-2r LoRA whose halves are masked per row (no in-place writes, no copy of the output), and the split
  stays on the route for the whole step, so that activation recomputation (gradient checkpointing) routes rows
  the same way.

PEFT's mixed-adapter batches (``adapter_names=``) refuse training mode, hence this module. A module exports as an
ordinary PEFT LoRA adapter (:meth:`FastSlowLora.save_adapter`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapters.base import Parametrization
from ..data.collate import SequenceBatch
from ..models.shards import copy_whole_
from .combine import write_peft_lora

MODULES = ("fast", "slow")


@dataclass
class Route:
    mode: str = "off"  # off | fast | slow | split
    split: int = 0  # rows [0, split) fast, the rest slow (mode split)
    _masks: dict = field(default_factory=dict, repr=False)

    def row_mask(self, x: Tensor, r: int) -> Tensor:
        """(R, 1, …, 2r) of 0/1: row i keeps the first r (fast) columns when i < split, else the last r."""
        key = (self.split, x.shape[0], x.dim(), r, x.device, x.dtype)
        if key not in self._masks:
            if len(self._masks) > 64:  # shapes vary with the batches; keep the cache small
                self._masks.clear()
            fast = (torch.arange(x.shape[0], device=x.device) < self.split)[:, None]
            cols = torch.arange(2 * r, device=x.device)[None, :] < r
            mask = (fast == cols).to(x.dtype)  # (R, 2r)
            self._masks[key] = mask.view(x.shape[0], *([1] * (x.dim() - 2)), 2 * r)
        return self._masks[key]


class TwoLoraLinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float, route: Route, init_same: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.base, self.route, self.scale = base, route, alpha / r
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()  # on the input of A, as PEFT's LoRA
        a = torch.empty(r, base.in_features, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default LoRA init
        second = a.clone()
        if not init_same:
            nn.init.kaiming_uniform_(second, a=math.sqrt(5))
        zeros = torch.zeros(base.out_features, r, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ParameterDict({"fast": nn.Parameter(a), "slow": nn.Parameter(second)})
        self.lora_B = nn.ParameterDict({"fast": nn.Parameter(zeros.clone()), "slow": nn.Parameter(zeros.clone())})

    def delta(self, module: str, x: Tensor) -> Tensor:
        return (self.dropout(x) @ self.lora_A[module].T) @ self.lora_B[module].T * self.scale

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        mode = self.route.mode
        if mode == "off":
            return y
        if mode in MODULES:
            return y + self.delta(mode, x)
        if mode != "split":
            raise ValueError(f"route mode {mode!r}: expected off, fast, slow or split")
        # both modules as one LoRA of rank 2r whose halves are masked per row: two small GEMMs over all rows
        # and a single add, instead of per-half products joined by a copy (cat) of the full-width output
        a = torch.cat([self.lora_A["fast"], self.lora_A["slow"]], dim=0)  # (2r, in)
        b = torch.cat([self.lora_B["fast"], self.lora_B["slow"]], dim=1)  # (out, 2r)
        return y + ((self.dropout(x) @ a.T) * self.route.row_mask(x, a.shape[0] // 2)) @ b.T * self.scale


def _targets(model: nn.Module, names: tuple[str, ...] = ("all-linear",)) -> list[str]:
    """Every Linear but the head (``all-linear``), or those whose last name is in ``names``."""
    head = model.get_output_embeddings()
    found = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head
             and (names == ("all-linear",) or n.rsplit(".", 1)[-1] in names)]
    if not found:
        raise ValueError(f"target_modules: no nn.Linear named {list(names)} in {type(model).__name__}")
    return found


class FastSlowLora:
    """A causal LM whose every Linear but the head carries the two modules; ``model`` runs what ``route`` says."""

    def __init__(self, model: nn.Module, r: int = 16, alpha: float = 32.0, init_same: bool = True,
                 dropout: float = 0.0, target_modules: tuple[str, ...] = ("all-linear",)):
        self.model, self.r, self.alpha, self.dropout = model.requires_grad_(False), r, alpha, dropout
        self.route = Route()
        self.layers: dict[str, TwoLoraLinear] = {}
        for name in _targets(model, target_modules):
            layer = TwoLoraLinear(model.get_submodule(name), r, alpha, self.route, init_same, dropout)
            model.set_submodule(name, layer)
            self.layers[name] = layer

    def parameters(self, module: str) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.lora_A[module], layer.lora_B[module])]

    @contextmanager
    def routed(self, mode: str, split: int = 0):
        """Within the block every forward (and any recomputation of it) runs ``mode``."""
        before = (self.route.mode, self.route.split)
        self.route.mode, self.route.split = mode, split
        try:
            yield self.model
        finally:
            self.route.mode, self.route.split = before

    def state_dict(self, module: str) -> dict[str, Tensor]:
        """``module``'s factors under PEFT's names (``base_model.model.<layer>.lora_A.weight``)."""
        out = {}
        for name, layer in self.layers.items():
            out[f"base_model.model.{name}.lora_A.weight"] = layer.lora_A[module].detach().contiguous()
            out[f"base_model.model.{name}.lora_B.weight"] = layer.lora_B[module].detach().contiguous()
        return out

    def save_adapter(self, module: str, out_dir: Path) -> None:
        """``module`` as a PEFT LoRA adapter directory that plain ``peft`` loads onto the base model."""
        write_peft_lora(self.state_dict(module), self.r, self.alpha, list(self.layers),
                        getattr(self.model.config, "_name_or_path", None), out_dir, self.dropout)

    def load_adapter(self, module: str, out_dir: Path) -> None:
        """``module``'s factors from a PEFT LoRA adapter directory written by :meth:`save_adapter`."""
        from safetensors.torch import load_file

        saved = load_file(Path(out_dir) / "adapter_model.safetensors")
        with torch.no_grad():
            for name, layer in self.layers.items():
                for kind in ("lora_A", "lora_B"):  # (a sharded engine's parameters take their shards)
                    copy_whole_(getattr(layer, kind)[module], saved[f"base_model.model.{name}.{kind}.weight"])


class FastSlowPair(Parametrization):
    """The LoRA pair as a parametrization: the reference is the base (route ``off``), and forwards outside an explicit
    route run the *resting* module (the leader, set by the schedule), so that evaluation, generation and export
    see the policy the run would return. Both modules in one forward (:meth:`routed` ``split``) is this pair's own:
    ``fused`` (a pair of any other parametrization is :class:`preflab.ofs.module_pair.ModulePair`)."""

    count_convention = "LoRA factor elements of both modules"
    fused = True

    def __init__(self, model: nn.Module, r: int, alpha: float, init_same: bool = True, dropout: float = 0.0,
                 target_modules: tuple[str, ...] = ("all-linear",)):
        self.pair = FastSlowLora(model, r, alpha, init_same, dropout, target_modules)
        self.model = self.pair.model
        self.rest_on("fast")

    def parameters(self, module: str) -> list[nn.Parameter]:
        return self.pair.parameters(module)

    def routed(self, mode: str, split: int = 0):
        return self.pair.routed(mode, split)

    def save_module(self, module: str, out_dir: Path) -> None:
        self.pair.save_adapter(module, out_dir)

    def load_module(self, module: str, out_dir: Path) -> None:
        self.pair.load_adapter(module, out_dir)

    def rest_on(self, module: str) -> None:
        self.pair.route.mode, self.pair.route.split = module, 0

    def follow(self, other: Parametrization) -> None:
        self.rest_on(other.resting)

    @property
    def resting(self) -> str:
        return self.pair.route.mode

    @contextmanager
    def reference(self):
        with self.pair.routed("off") as model:
            yield model

    def merged_model(self) -> nn.Module:
        """A plain copy with the resting module folded into the weights."""
        import copy

        merged = copy.deepcopy(self.model)
        for name, layer in self.pair.layers.items():
            twin = merged.get_submodule(name)
            base = twin.base
            with torch.no_grad():
                base.weight += layer.scale * twin.lora_B[self.resting] @ twin.lora_A[self.resting]
            merged.set_submodule(name, base)
        return merged

    def save_final(self, out_dir: Path) -> None:
        self.pair.save_adapter(self.resting, out_dir)


def duplicate_rows(batch: SequenceBatch) -> SequenceBatch:
    """The batch twice along the rows; the copy's output sequences are numbered after the original's, so the
    scorer returns ``2S`` log-probs: ``[0, S)`` of the first copy, ``[S, 2S)`` of the second."""
    s = batch.num_sequences
    target_seq = torch.cat([batch.target_seq, torch.where(batch.target_seq >= 0, batch.target_seq + s, -1)])
    position_ids = None if batch.position_ids is None else torch.cat([batch.position_ids] * 2)
    target_shared = None if batch.target_shared is None else torch.cat([batch.target_shared] * 2)
    return replace(batch, input_ids=torch.cat([batch.input_ids] * 2), target_shared=target_shared,
                   attention_mask=torch.cat([batch.attention_mask] * 2), target_ids=torch.cat([batch.target_ids] * 2),
                   target_seq=target_seq, position_ids=position_ids, num_tokens=2 * batch.num_tokens,
                   num_seqs=2 * s)
