"""DeepSpeed ZeRO-2/3: accumulation, clipping and the update run inside DeepSpeed's engine, at the boundary that
preflab's own micro-batch loop sets; its partitioned optimizer state is DeepSpeed's own files in the checkpoint
(``deepspeed/``, every process its partition), resumable under DeepSpeed with as many processes. ZeRO-3 also shards
the weights (its forwards are collectives, whole tensors are gathered from the partitions)."""

from __future__ import annotations

from pathlib import Path

import torch

from ...config import ConfigError
from ..checkpoint import DEEPSPEED_DIR, deepspeed_partitions
from .ddp import DdpEngine
from .fsdp import ShardedEngine


class DeepSpeedEngine(DdpEngine):
    name = "deepspeed"

    def __init__(self, accelerator, zero_stage: int):
        super().__init__(accelerator)
        self.zero_stage = zero_stage

    @property
    def label(self) -> str:
        return f"DeepSpeed ZeRO-{self.zero_stage}"

    @property
    def banner(self) -> str:
        return f"deepspeed ZeRO-{self.zero_stage}"

    def configure(self, batch_size: int, grad_accum: int, max_grad_norm: float | None) -> None:
        """DeepSpeed's batch, accumulation and clipping from ``train.*`` (the config file's values are replaced)."""
        self.accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=grad_accum,
            train_batch_size=batch_size * grad_accum * self.world, gradient_clipping=max_grad_norm or 0.0)

    def backward(self, loss: torch.Tensor, sync: bool, forwards: int = 1) -> None:
        # the boundary from preflab's micro-batch loop, the loss already scaled for the accumulation; the engine
        # clips (train.max_grad_norm) and updates at the boundary
        self.model.set_gradient_accumulation_boundary(sync)
        self.model.backward(loss, scale_wrt_gas=False)
        self.model.step()

    def clip(self, groups: list[list[torch.nn.Parameter]], max_norm: float) -> list[float]:
        return [float(self.model.get_global_grad_norm())]  # clipped by the engine in the last backward

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """(the engine updated in the last backward)"""

    def optimizer_state(self, optimizer: torch.optim.Optimizer, keep: bool) -> dict | None:
        return None

    def write_own_files(self, directory_of_main: Path | None) -> None:
        directory = self.share(directory_of_main)  # every process writes its partition into the main's directory
        self.model.save_checkpoint(str(directory / DEEPSPEED_DIR), tag="state", save_latest=False,
                                   exclude_frozen_parameters=True)
        self.barrier()

    def check_resumable(self, path: Path) -> None:
        parts = deepspeed_partitions(path)
        if parts != self.world:
            written = f"under DeepSpeed with {parts} processes" if parts else "without DeepSpeed"
            raise ConfigError(f"resume: {path} was written {written}; under DeepSpeed resume it with that engine and "
                              "number of processes (or start a new output_dir)")

    def restore(self, checkpoint: dict, path: Path, policy, optimizer: torch.optim.Optimizer) -> None:
        # DeepSpeed's files: the trained weights and this process's optimizer partition
        self.model.load_checkpoint(str(Path(path) / DEEPSPEED_DIR), tag="state", load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=False)


class Zero3Engine(DeepSpeedEngine, ShardedEngine):
    """ZeRO-3: DeepSpeed's update and files, sharded weights."""

    def __init__(self, accelerator, zero_stage: int):
        super().__init__(accelerator, zero_stage)
        # With a ZeRO-3 config registered transformers partitions a model while loading it and syncs generation
        # over the processes: collectives every process must join (a driver's or the main process's whole copy
        # would hang), and a partitioned model gives no reference copy. preflab loads every model whole (the
        # engine partitions the policy when it is prepared): the registration accelerate made is dropped.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
