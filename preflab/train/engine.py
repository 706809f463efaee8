"""The distributed engine a run is launched under, and what changes when that engine shards the weights.

``accelerate launch`` tells every process its engine through the environment: ``ACCELERATE_USE_FSDP=true``
(FSDP, accelerate's FSDP2 plugin), ``ACCELERATE_USE_DEEPSPEED=true`` (DeepSpeed ZeRO), neither with several
processes (DDP). On a machine without GPUs accelerate 1.15 starts gloo process groups but builds DDP only; preflab
then sets the process state up so that FSDP2 runs over gloo too (the CPU test of the sharded path).

Under FSDP the trained tensors are ``DTensor`` shards. preflab keeps one checkpoint and ``final/`` format for every
engine: whole tensors by parameter name (gathered to the main process one tensor at a time) and the optimizer state
in torch's own layout with whole tensors, so a run resumes under any engine and any number of processes.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType

from ..config import Config, ConfigError

SHARDED = ("fsdp",)  # engines whose processes hold shards of the trained tensors


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


def make_accelerator(**kwargs) -> Accelerator:
    """The run's ``Accelerator`` for the launched engine (``kwargs``: mixed precision, trackers, project dir)."""
    if launched_engine() == "fsdp" and cpu_processes():
        # accelerate builds FSDP only from a GPU process type; the gloo process group serves FSDP2 as it is
        PartialState(cpu=True).distributed_type = DistributedType.MULTI_GPU
    return Accelerator(cpu=cpu_processes(), **kwargs)


# what each engine refuses, checked before any work: (condition on the config, what to say)
_FSDP_REFUSALS = (
    (lambda c: c.schedule != "offline",
     lambda c: f"schedule {c.schedule} swaps, merges or extrapolates whole weights between steps; under FSDP only the "
               "offline schedule is supported"),
    (lambda c: c.optim.name != "adamw",
     lambda c: f"optim.name={c.optim.name} merges every update with whole task vectors; under FSDP use adamw"),
    (lambda c: c.diag.enabled,
     lambda c: "the 3D diagnostics sample and measure with unsharded weights; set diag.enabled=false under FSDP"),
)


def check_engine(config: Config, engine: str | None = None) -> None:
    """A clear error, before any work, for a combination the launched engine does not support."""
    engine = engine or launched_engine()
    if engine == "deepspeed":
        raise ConfigError("accelerate: DeepSpeed is not supported yet (its ZeRO optimizer keeps its own partitioned "
                          "state and step logic); launch with configs/accelerate/fsdp.yaml (sharded) or ddp.yaml")
    if engine == "fsdp":
        for refused, message in _FSDP_REFUSALS:
            if refused(config):
                raise ConfigError(f"accelerate FSDP: {message(config)} (or launch with configs/accelerate/ddp.yaml)")


# -- whole tensors from shards and back --------------------------------------------------------------------------


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (a collective for a shard: every process calls it, in the same order)."""
    return (tensor.full_tensor() if is_sharded(tensor) else tensor).detach().cpu()


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
    """An optimizer ``state_dict`` with whole tensors in place of shards (None where not ``keep``)."""
    state = {}
    for index in sorted(state_dict["state"]):
        entry = {key: whole(value) if torch.is_tensor(value) else value
                 for key, value in state_dict["state"][index].items()}
        state[index] = entry
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
