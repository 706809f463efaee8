"""LoRA and DoRA through PEFT. The reference is the same network with the adapter disabled: no copy.

- LoRA: Hu et al., arXiv 2106.09685. ``W + (α/r)·B·A`` with ``B = 0`` at the start, so the policy starts
  equal to the reference.
- DoRA: Liu et al., arXiv 2402.09353 (PEFT ``use_dora=True``): magnitude and direction decomposed.

With ``init_adapter`` (a PEFT adapter directory, e.g. an SFT run's ``final/``) the policy continues training that
adapter on ``model.name``, and the reference is the model with the adapter as it was loaded (a frozen copy of its
factors held as a second PEFT adapter), so that the policy again starts equal to the reference. This is the setting
of the online merging optimizers' ``adapter_mode: adapter_space``. Schedules that start modules of their own (OFS's
pair, APO's iterations, COFS's stages) fold the adapter into the weights instead (:func:`fold_adapter`).
"""

from __future__ import annotations

import copy
import json
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
    # a PEFT adapter directory to continue training (r, alpha and dropout must be the adapter's; its own target
    # modules are used unless target_modules names others); the reference is the model with it as loaded
    init_adapter: str | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r: must be >= 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules: must name at least one module (or all-linear)")


REFERENCE = "reference"  # the frozen copy of an init_adapter: the reference


def _check_init_adapter(params: LoraParams, use_dora: bool) -> Path:
    path = Path(params.init_adapter)
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"init_adapter: {path} holds no adapter_config.json (a PEFT adapter directory)")
    saved = json.loads((path / "adapter_config.json").read_text())
    if saved.get("peft_type") != "LORA":
        raise ValueError(f"init_adapter: {path} is a {saved.get('peft_type')} adapter, not LoRA")
    found = {"r": saved.get("r"), "alpha": saved.get("lora_alpha"), "dropout": saved.get("lora_dropout", 0.0)}
    for key, value in found.items():
        if value != getattr(params, key):
            raise ValueError(f"{key}: {getattr(params, key)} differs from the init_adapter's {value} ({path}); set "
                             f"parametrization.{key}={value}")
    if bool(saved.get("use_dora")) != use_dora:
        kind = "dora" if saved.get("use_dora") else "lora"
        raise ValueError(f"init_adapter: {path} is a {kind} adapter; set parametrization.kind={kind}")
    targets = saved.get("target_modules")
    targets = {targets} if isinstance(targets, str) else set(targets or ())
    if params.target_modules != ("all-linear",) and set(params.target_modules) != targets:
        raise ValueError(f"target_modules: {list(params.target_modules)} differ from the init_adapter's "
                         f"{sorted(targets)} ({path})")
    return path


def fold_adapter(model: nn.Module, params: LoraParams, use_dora: bool) -> nn.Module:
    """``model`` with ``params.init_adapter`` merged into its weights (W + ΔW), checked against ``params`` as a
    continued adapter is: a plain model whose function is the base with the adapter."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, _check_init_adapter(params, use_dora)).merge_and_unload()


class PeftAdapter(Parametrization):
    def __init__(self, model: nn.Module, params: LoraParams, use_dora: bool):
        from peft import LoraConfig, PeftModel, get_peft_model

        self.continued = params.init_adapter is not None
        if self.continued:
            path = _check_init_adapter(params, use_dora)
            self.model = PeftModel.from_pretrained(model, path, is_trainable=True)
            self.model.load_adapter(path, adapter_name=REFERENCE, is_trainable=False)
            self.model.set_adapter("default")
            return
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
        if not self.continued:
            with self.model.disable_adapter():
                yield self.model
            return
        # the loaded adapter's frozen copy runs instead of the trained one; switching back makes the trained one
        # the only trainable adapter again, as it was
        self.model.set_adapter(REFERENCE, inference_mode=True)
        try:
            yield self.model
        finally:
            self.model.set_adapter("default")

    def merged_model(self) -> nn.Module:
        """A copy with ``W + ΔW`` folded in (PEFT's merge on a deep copy: the trained adapter stays as it is)."""
        return copy.deepcopy(self.model).merge_and_unload(adapter_names=["default"])

    def save_final(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir, selected_adapters=["default"])


def _lora_pair(model: nn.Module, p: LoraParams, init_same: bool) -> Parametrization:
    """Two LoRA modules on one network, both in one routed forward (preflab.ofs.pair)."""
    from ..ofs.pair import FastSlowPair

    return FastSlowPair(model, p.r, p.alpha, init_same, p.dropout, p.target_modules)


register_parametrization("lora", LoraParams, lambda model, p: PeftAdapter(model, p, use_dora=False), pair=_lora_pair)
register_parametrization("dora", LoraParams, lambda model, p: PeftAdapter(model, p, use_dora=True))
