"""Whole tensors from the shards of FSDP (``DTensor``) and DeepSpeed ZeRO-3 (partitioned parameters), and back.

preflab keeps one format for ``final/`` and for the weights of a checkpoint under every engine: whole tensors by
parameter name, gathered to the main process one tensor at a time; FSDP's optimizer state the same way (torch's
layout), so that an FSDP checkpoint resumes under any engine and number of processes.
"""

from __future__ import annotations

import torch


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
    process holds the whole copies); its other entries (the merging optimizers' mask generator) as they are."""
    state = {}
    for index in sorted(state_dict["state"]):
        entry = state_dict["state"][index]
        state[index] = {**entry, **gather_named({k: v for k, v in entry.items() if torch.is_tensor(v)}, keep)}
    return {**state_dict, "state": state} if keep else None


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of the whole ``tensor``, laid out as ``like`` (``tensor`` itself when ``like`` is whole).
    Every process holds the whole tensor (read from the same file): no communication."""
    if not is_sharded(like):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def copy_whole_(param: torch.Tensor, value: torch.Tensor) -> None:
    """Writes the whole tensor ``value`` into ``param`` (under no_grad): into its shard where ``param`` is an FSDP
    ``DTensor`` (no communication: every process holds ``value``); into its partitions where it is a DeepSpeed ZeRO-3
    parameter (a collective: every process calls it, in the same order); else a plain copy."""
    if is_sharded(param):
        param.copy_(shard_like(value, param))
    elif hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.copy_(value.to(param.device, param.dtype))
    else:
        param.copy_(value)


def shard_optimizer_state(state_dict: dict, params: list[torch.Tensor]) -> dict:
    """A whole-tensor optimizer ``state_dict`` with every per-parameter tensor of the parameter's shape turned into
    this process's shard of it (``params``: the optimizer's parameters in its order)."""
    state = {}
    for index, entry in state_dict["state"].items():
        param = params[int(index)]
        state[index] = {key: shard_like(value, param) if torch.is_tensor(value) and value.shape == param.shape
                        else value for key, value in entry.items()}
    return {**state_dict, "state": state}


def move_state_to_shards(optimizer: torch.optim.Optimizer, before: list[torch.Tensor]) -> None:
    """Re-keys the per-parameter state an optimizer held before FSDP swapped its parameters for their shards
    (``before``: the parameters in the optimizer's order then; accelerate swaps the ``param_groups`` only, so the
    merging optimizers' task vectors would be left on the whole originals): every tensor of the parameter's shape
    becomes this process's shard of it. No communication."""
    after = [p for g in optimizer.param_groups for p in g["params"]]
    for old, new in zip(before, after, strict=True):
        if new is old or old not in optimizer.state:
            continue
        entry = optimizer.state.pop(old)
        optimizer.state[new] = {key: shard_like(value, new) if torch.is_tensor(value) and value.shape == new.shape
                                else value for key, value in entry.items()}
