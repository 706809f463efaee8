"""Full fine-tuning: every weight moves; the reference is a frozen copy of the starting model."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .base import Parametrization, register_parametrization


@dataclass(frozen=True)
class FullParams:
    pass


class FullFineTune(Parametrization):
    def __init__(self, model: nn.Module, params: FullParams):
        self.reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.model = model.requires_grad_(True)

    def place(self, device) -> None:
        self.model.to(device)
        self.reference_model.to(device)

    @contextmanager
    def reference(self):
        yield self.reference_model

    def share_reference(self, other) -> None:
        self.reference_model = other.reference_model  # one frozen copy serves both

    def merged_model(self) -> nn.Module:
        return self.model

    def save_final(self, out_dir: Path) -> None:
        self.model.save_pretrained(out_dir)


register_parametrization("full", FullParams, FullFineTune)
