"""What an offline-like schedule supplies to the training loop: the step's loss for a batch given the reference
log-probs, which tensors train and how they are grouped and clipped, its own state, what it exports.

The loop (:class:`preflab.train.loop.TrainingRun`) owns everything else — batch order, micro-batches and
accumulation, the non-finite policy, logging, checkpoints and resume, evaluation — and calls the engine for every
backward, clip and update. A new offline-like schedule is one module with a :class:`StepProgram` subclass and its
settings, registered with :func:`preflab.train.schedules.register_schedule`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from ..adapters import Parametrization, build_parametrization
from ..config import Config


@dataclass
class StepResult:
    """One micro-batch's forward: the loss summed over this process's pairs (every term, every module), what a
    non-finite loss is reported as, and the per-pair metrics (detached, ``(B,)`` each)."""

    loss_sum: Tensor
    shown: Callable[[], float]  # (only called for the message: no device sync otherwise)
    metrics: dict[str, Tensor]


class StepProgram:
    """The offline schedule's step: one policy forward, the objective. Subclasses change what differs."""

    forwards = 1  # policy forwards before each backward (the engine synchronises gradients after them)

    def __init__(self, config: Config):
        self.config = config

    def parametrization(self, model: torch.nn.Module) -> Parametrization:
        pc = self.config.parametrization
        return build_parametrization(pc.name, pc.params, model)

    def param_groups(self, param: Parametrization) -> list[dict]:
        """AdamW-style groups: weight decay (``train.weight_decay``) on matrices, none on biases and norms."""
        trainable = [p for p in param.model.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.ndim >= 2]
        rest = [p for p in trainable if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.config.train.weight_decay},
                  {"params": rest, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def prepare(self, run) -> None:
        """Called once the run holds its pieces (checks that need the built objective or parametrization)."""

    def forward(self, run, batch, ref: tuple[Tensor, Tensor] | None) -> StepResult:
        """The step's loss: ``ref`` is the reference's ``(logps, shared)`` of the batch's sequences, each ``(2B,)``
        (:meth:`ReferenceLogps.logps`), None for a reference-free objective."""
        raise NotImplementedError

    def recomputation(self, run, batch):
        """The context the backward runs in (a forward that gradient checkpointing recomputes must route alike)."""
        return nullcontext()

    def clip(self, run, max_norm: float, record: dict) -> float:
        """Clips the trainable gradients; the norm before clipping."""
        return run.engine.clip([list(run.param.trainable_parameters().values())], max_norm)[0]

    def after_update(self, run, record: dict) -> None:
        """After every optimizer step (skipped or not), with the step's record."""

    def after_restore(self, run) -> None:
        """After a checkpoint was restored into the run."""

    def save_files(self, run, directory) -> None:
        """Files of the schedule's own that a checkpoint must keep (main process, into the checkpoint's directory)."""

    def restore_files(self, run, checkpoint) -> None:
        """Puts the schedule's files back from a checkpoint being restored (main process)."""

    def evaluate(self, run, result: dict | None, policy_is_reference: bool) -> dict | None:
        """The held-out evaluation's result, amended by the schedule."""
        return result

    def finish(self, run) -> None:
        """Once the last step is done, before the final evaluation and export."""
