"""LoRA and DoRA through PEFT. The reference is the same network with the adapter disabled: no copy.

- LoRA: Hu et al., arXiv 2106.09685. ``W + (α/r)·B·A`` with ``B = 0`` at the start, so the policy starts
  equal to the reference.
- DoRA: Liu et al., arXiv 2402.09353 (PEFT ``use_dora=True``): magnitude and direction decomposed.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .base import Parametrization, register_parametrization


@dataclass(frozen=True)
class LoraParams:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("all-linear",)  # module names, or all-linear (every Linear but the head)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r: must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules: must name at least one module (or all-linear)")


class PeftAdapter(Parametrization):
    def __init__(self, model: nn.Module, params: LoraParams, use_dora: bool):
        from peft import LoraConfig, get_peft_model

        targets = params.target_modules
        config = LoraConfig(
            r=params.r, lora_alpha=params.alpha, lora_dropout=params.dropout, use_dora=use_dora,
            target_modules="all-linear" if targets == ("all-linear",) else list(targets), task_type="CAUSAL_LM",
        )
        try:
            self.model = get_peft_model(model, config)
        except ValueError as e:  # PEFT names the module it could not find
            raise ValueError(f"target_modules: {e}") from None

    @contextmanager
    def reference(self):
        with self.model.disable_adapter():
            yield self.model

    def merged_model(self) -> nn.Module:
        """A copy with ``W + ΔW`` folded in (PEFT's merge on a deep copy: the trained adapter stays as it is)."""
        return copy.deepcopy(self.model).merge_and_unload()

    def save_final(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir)


def _lora_pair(model: nn.Module, p: LoraParams, init_same: bool) -> Parametrization:
    """Two LoRA modules on one network, both in one routed forward (preflab.ofs.pair)."""
    from ..ofs.pair import FastSlowPair

    return FastSlowPair(model, p.r, p.alpha, init_same, p.dropout, p.target_modules)


register_parametrization("lora", LoraParams, lambda model, p: PeftAdapter(model, p, use_dora=False), pair=_lora_pair)
register_parametrization("dora", LoraParams, lambda model, p: PeftAdapter(model, p, use_dora=True))
