"""The distributed engine a run is launched under, and what changes when that engine shards the weights.

``accelerate launch`` tells every process its engine through the environment: ``ACCELERATE_USE_FSDP=true``
(FSDP, accelerate's FSDP2 plugin), ``ACCELERATE_USE_DEEPSPEED=true`` (DeepSpeed ZeRO), neither with several
processes (DDP). On a machine without GPUs accelerate 1.15 builds DDP over gloo only; preflab sets the process state
up so that FSDP2 and DeepSpeed run over gloo too (the CPU tests of those paths).

Under FSDP and ZeRO-3 the trained tensors are shards (``DTensor``, or DeepSpeed's partitioned parameters). preflab
keeps one format for ``final/`` and for the weights of a checkpoint under every engine: whole tensors by parameter
name, gathered to the main process one tensor at a time. Under FSDP the optimizer state is gathered the same way
(torch's layout, whole tensors), so an FSDP checkpoint resumes under any engine and number of processes; DeepSpeed
keeps its own partitioned optimizer state (``deepspeed/`` in the checkpoint), resumable under DeepSpeed with the
same number of processes.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType

from ..config import Config, ConfigError, TrainConfig


@dataclass(frozen=True)
class Engine:
    name: str  # single | ddp | fsdp | deepspeed
    zero_stage: int = 0  # DeepSpeed's ZeRO stage

    @property
    def shards_weights(self) -> bool:
        """Each process holds a shard of every weight: forwards are collectives, whole tensors must be gathered."""
        return self.name == "fsdp" or self.zero_stage == 3

    @property
    def owns_step(self) -> bool:
        """Accumulation, clipping and the update run inside the engine (DeepSpeed), not in preflab's loop."""
        return self.name == "deepspeed"

    @contextmanager
    def plain_models(self):
        """Within it transformers treats models as plain, one-process ones. With a ZeRO-3 config registered it would
        partition a model while loading it and sync generation over the processes: collectives every process must
        join (the main process's unsharded copy would hang), and a partitioned model gives no reference copy.
        preflab loads models whole; the engine partitions the policy when it is built."""
        if self.zero_stage != 3:
            yield
            return
        from transformers.integrations import deepspeed as hf_deepspeed

        registered = hf_deepspeed._hf_deepspeed_config_weak_ref
        hf_deepspeed.unset_hf_deepspeed_config()
        try:
            yield
        finally:
            if registered is not None and registered() is not None:
                hf_deepspeed.set_hf_deepspeed_config(registered())


def launched_engine() -> str:
    """``single``, ``ddp``, ``fsdp`` or ``deepspeed``: what ``accelerate launch`` (or torchrun) started."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def cpu_processes() -> bool:
    """Several processes and no GPU: accelerate then runs over gloo only when told it is on the CPU."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def make_accelerator(**kwargs) -> tuple[Accelerator, Engine]:
    """The run's ``Accelerator`` for the launched engine (``kwargs``: mixed precision, trackers, project dir)."""
    name = launched_engine()
    if name == "deepspeed":
        if cpu_processes():  # accelerate would count one process: name the gloo group it must join
            PartialState(backend="gloo")
        accelerator = Accelerator(**kwargs)
        return accelerator, Engine(name, accelerator.state.deepspeed_plugin.zero_stage)
    if name == "fsdp" and cpu_processes():
        # accelerate builds FSDP only from a GPU process type; the gloo process group serves FSDP2 as it is
        PartialState(cpu=True).distributed_type = DistributedType.MULTI_GPU
    return Accelerator(cpu=cpu_processes(), **kwargs), Engine(name)


def configure_deepspeed(accelerator: Accelerator, train: TrainConfig) -> None:
    """DeepSpeed's batch, accumulation and clipping come from ``train.*`` (the config file's values are replaced)."""
    world = accelerator.num_processes
    accelerator.state.deepspeed_plugin.deepspeed_config.update(
        train_micro_batch_size_per_gpu=train.batch_size, gradient_accumulation_steps=train.grad_accum,
        train_batch_size=train.batch_size * train.grad_accum * world, gradient_clipping=train.max_grad_norm or 0.0)


# what FSDP and DeepSpeed refuse, checked before any work: (condition on the config, what to say)
_SHARDED_REFUSALS = (
    (lambda c: c.schedule != "offline",
     lambda c: f"schedule {c.schedule} swaps, merges or extrapolates whole weights between steps; only the offline "
               "schedule is supported"),
    (lambda c: c.optim.name != "adamw",
     lambda c: f"optim.name={c.optim.name} merges every update with whole task vectors; use adamw"),
    (lambda c: c.diag.enabled,
     lambda c: "the 3D diagnostics sample and measure with unsharded weights; set diag.enabled=false"),
)


def check_engine(config: Config, engine: str | None = None) -> None:
    """A clear error, before any work, for a combination the launched engine does not support."""
    engine = engine or launched_engine()
    if engine not in ("fsdp", "deepspeed"):
        return
    label = {"fsdp": "FSDP", "deepspeed": "DeepSpeed"}[engine]
    for refused, message in _SHARDED_REFUSALS:
        if refused(config):
            raise ConfigError(f"accelerate {label}: {message(config)} under {label} (or launch with "
                              "configs/accelerate/ddp.yaml)")
    if engine == "deepspeed" and config.train.on_nonfinite == "skip":
        raise ConfigError("accelerate DeepSpeed: train.on_nonfinite=skip cannot skip an update that DeepSpeed applies "
                          "inside its backward; use train.on_nonfinite=stop (or launch with another engine)")


# -- whole tensors from shards and back --------------------------------------------------------------------------


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (a collective for a shard: every process calls it, in the same order)."""
    if is_sharded(tensor):
        return tensor.detach().full_tensor().cpu()
    if hasattr(tensor, "ds_id"):  # a DeepSpeed ZeRO-3 partitioned parameter
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor]):
            return tensor.detach().cpu().clone()
    return tensor.detach().cpu()


def gather_named(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Whole copies of ``tensors`` (one at a time: a shard's gather never holds more than one whole tensor on the
    device); returned only where ``keep`` (the main process), the others get ``{}``."""
    out = {}
    for name, tensor in tensors.items():
        full = whole(tensor)
        if keep:
            out[name] = full
    return out


def gather_optimizer_state(state_dict: dict, keep: bool) -> dict | None:
    """An optimizer ``state_dict`` with whole tensors in place of shards (None where not ``keep``: only the main
    process holds the whole copies)."""
    state = {}
    for index in sorted(state_dict["state"]):
        entry = state_dict["state"][index]
        state[index] = {**entry, **gather_named({k: v for k, v in entry.items() if torch.is_tensor(v)}, keep)}
    return {"state": state, "param_groups": state_dict["param_groups"]} if keep else None


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of the whole ``tensor``, laid out as ``like`` (``tensor`` itself when ``like`` is whole).
    Every process holds the whole tensor (read from the same file): no communication."""
    if not is_sharded(like):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def shard_optimizer_state(state_dict: dict, params: list[torch.Tensor]) -> dict:
    """A whole-tensor optimizer ``state_dict`` with every per-parameter tensor of the parameter's shape turned into
    this process's shard of it (``params``: the optimizer's parameters in its order)."""
    state = {}
    for index, entry in state_dict["state"].items():
        param = params[int(index)]
        state[index] = {key: shard_like(value, param) if torch.is_tensor(value) and value.shape == param.shape
                        else value for key, value in entry.items()}
    return {"state": state, "param_groups": state_dict["param_groups"]}
