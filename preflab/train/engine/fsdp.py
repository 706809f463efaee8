"""FSDP (accelerate's FSDP2 plugin): each process holds a shard of every weight. Forwards of the policy's network are
collectives that every process runs together; whole tensors are gathered for checkpoints and ``final/`` and each
process takes its shards back from them on resume (an FSDP checkpoint resumes under any engine and process count)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ...models.shards import gather_named, gather_optimizer_state, move_state_to_shards, shard_optimizer_state
from .ddp import DdpEngine


class ShardedEngine(DdpEngine):
    """What FSDP and ZeRO-3 share: sharded weights, so collective forwards and gathered state."""

    def collective_need(self, needed: bool) -> bool:
        return self.anywhere(needed)

    def common_count(self, count: int) -> int:
        return self.most(count)

    def reference_module(self, reference: torch.nn.Module, policy: torch.nn.Module) -> torch.nn.Module | None:
        # the policy's own network with the trained part off: through the prepared model (under FSDP only its
        # root gathers the sharded embeddings and head)
        return self.model if reference is policy else None

    def trainable_state(self, policy, keep: bool = True) -> dict[str, torch.Tensor]:
        # the parameters themselves: a detached ZeRO-3 parameter no longer knows its partitions
        return gather_named(policy.trainable_parameters(), keep)

    def whole_policy(self, policy, rebuild: Callable[[dict], object]):
        state = self.trainable_state(policy, keep=self.is_main)
        return rebuild(state) if self.is_main else None


class FsdpEngine(ShardedEngine):
    name = "fsdp"
    label = "FSDP"

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        before = [p for g in optimizer.param_groups for p in g["params"]]
        model, optimizer = super().prepare(model, optimizer)
        move_state_to_shards(optimizer, before)  # (the merging optimizers' task vectors, built on whole weights)
        return model, optimizer

    def optimizer_state(self, optimizer: torch.optim.Optimizer, keep: bool) -> dict | None:
        return gather_optimizer_state(optimizer.state_dict(), keep)

    def restore(self, checkpoint: dict, path: Path, policy, optimizer: torch.optim.Optimizer) -> None:
        # the checkpoint holds whole tensors: this process takes its shards (Parametrization.load_trainable_state_dict)
        policy.load_trainable_state_dict(checkpoint["trainable"])
        ordered = [p for g in optimizer.param_groups for p in g["params"]]
        optimizer.load_state_dict(shard_optimizer_state(checkpoint["optimizer"], ordered))
