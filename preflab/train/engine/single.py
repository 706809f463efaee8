"""The engine interface, as one process runs it: what the loop asks of the engine a run is launched under.

The loop calls every method unconditionally; an engine that differs (several processes, sharded weights, an update
inside the engine) overrides what differs (``ddp.py``, ``fsdp.py``, ``deepspeed.py``). Nothing here knows a schedule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

from ..checkpoint import check_not_deepspeed

log = logging.getLogger(__name__)

class Engine:
    """One process on one device."""

    name = "single"
    label = "one process"  # in messages

    @property
    def banner(self) -> str:
        """How the run's log names the engine."""
        return self.name

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.model: torch.nn.Module | None = None  # the prepared model (the scorer), set by prepare()

    # -- processes ------------------------------------------------------------------------------------------

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def reduce(self, record: dict, weight: float = 1.0, how: str = "mean") -> dict:
        """Metrics of this process's share → metrics of the global batch: the ``weight``-weighted mean or the sum
        over processes (one process: ``record`` itself)."""
        return record

    def anywhere(self, flag: bool) -> bool:
        """True when ``flag`` holds on any process (decisions every process must take together)."""
        return flag

    def most(self, count: int) -> int:
        """The largest ``count`` over the processes."""
        return count

    def share(self, value):
        """The main process's ``value`` on every process."""
        return value

    # -- setup ----------------------------------------------------------------------------------------------

    def configure(self, batch_size: int, grad_accum: int, max_grad_norm: float | None) -> None:
        """The engine's own view of the batch (DeepSpeed's config); nothing to do elsewhere."""

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, optimizer = self.accelerator.prepare(model, optimizer)
        return self.model, optimizer

    # -- forwards under sharding ----------------------------------------------------------------------------

    def collective_need(self, needed: bool) -> bool:
        """Whether every process must run a forward that only those where ``needed`` need: where the forward is a
        collective (sharded weights), when any process needs it. Every process calls it."""
        return False

    def common_count(self, count: int) -> int:
        """How many collective forwards every process runs when each needs ``count``."""
        return count

    def reference_module(self, reference: torch.nn.Module, policy: torch.nn.Module) -> torch.nn.Module | None:
        """The module to run a reference forward through: None for a plain scorer of ``reference``; the prepared
        model where the reference is the policy's own sharded network with the trained part switched off."""
        return None

    # -- a step ---------------------------------------------------------------------------------------------

    def no_sync(self, sync: bool, forwards: int = 1):
        """Within it, a backward does not synchronise gradients across processes (all micro-batches but the last
        of an update; ``forwards``: the policy forwards before the backward)."""
        return nullcontext() if sync else self.accelerator.no_sync(self.model)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor, sync: bool, forwards: int = 1) -> None:
        """Backward of one micro-batch's (already scaled) loss; ``sync``: the last of the update."""
        self.accelerator.backward(loss)

    def clip(self, groups: list[list[torch.nn.Parameter]], max_norm: float) -> list[float]:
        """Clips each group of parameters to ``max_norm`` (inf: measures only); their norms before clipping."""
        return [float(self.accelerator.clip_grad_norm_(params, max_norm)) for params in groups]

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    # -- state ----------------------------------------------------------------------------------------------

    def trainable_state(self, policy, keep: bool = True) -> dict[str, torch.Tensor]:
        """The trained tensors of the parametrization ``policy``, whole, by name (a collective where sharded: every
        process calls it; there, where not ``keep``, an empty dict)."""
        return policy.trainable_state_dict()

    def optimizer_state(self, optimizer: torch.optim.Optimizer, keep: bool) -> dict | None:
        """The optimizer's state for a checkpoint (whole tensors; None where the engine writes its own)."""
        return optimizer.state_dict()

    def rng_state(self, own: dict) -> dict:
        """The random state a checkpoint keeps: this process's (``own``), or every process's."""
        return own

    def own_rng(self, saved: dict) -> dict:
        """This process's random state out of a checkpoint's (one per process when several wrote it)."""
        if "processes" not in saved:
            return saved
        states = saved["processes"]
        if len(states) != self.world:
            log.warning("resume: the checkpoint holds the random states of %d processes, this run has %d; process %d "
                        "takes those of process %d (dropout masks will differ from the first run)", len(states),
                        self.world, self.rank, self.rank % len(states))
        return states[self.rank % len(states)]

    def write_own_files(self, directory_of_main: Path | None) -> None:
        """Files the engine writes into the checkpoint itself, every process its part (DeepSpeed)."""

    def check_resumable(self, path: Path) -> None:
        """A clear error where a checkpoint cannot resume under this engine (another engine's optimizer files)."""
        check_not_deepspeed(path)

    def restore(self, checkpoint: dict, path: Path, policy, optimizer: torch.optim.Optimizer) -> None:
        """The trained tensors (into the parametrization ``policy``) and the optimizer state of a checkpoint."""
        policy.load_trainable_state_dict(checkpoint["trainable"])
        optimizer.load_state_dict(checkpoint["optimizer"])

    def whole_policy(self, policy, rebuild: Callable[[dict], object]):
        """The policy with whole weights for generation and export: ``policy`` itself where weights are whole; under
        sharding the main process's copy that ``rebuild(state)`` makes from the gathered tensors (None elsewhere)."""
        return policy
