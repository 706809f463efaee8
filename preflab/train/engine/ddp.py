"""Several processes, each with the whole model (DDP through accelerate): metrics and decisions are reduced over the
processes, gradients synchronised at the last micro-batch of an update, every process's random state checkpointed."""

from __future__ import annotations

import torch
from accelerate.utils import broadcast_object_list
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .single import Engine


class DdpEngine(Engine):
    name = "ddp"
    label = "DDP"

    def reduce(self, record: dict, weight: float = 1.0, how: str = "mean") -> dict:
        if not record:
            return record
        keys = sorted(record)
        values = torch.tensor([float(record[k]) * weight for k in keys] + [weight], dtype=torch.float64,
                              device=self.device)
        total = self.accelerator.reduce(values, "sum").tolist()
        return {k: v / total[-1] if how == "mean" else v for k, v in zip(keys, total[:-1])}

    def anywhere(self, flag: bool) -> bool:
        return bool(self.accelerator.reduce(torch.tensor([float(flag)], device=self.device), "sum") > 0)

    def most(self, count: int) -> int:
        return int(self.accelerator.gather(torch.tensor([count], device=self.device)).max())

    def share(self, value):
        return broadcast_object_list([value])[0]

    def no_sync(self, sync: bool, forwards: int = 1):
        # DDP's reducer expects one forward per backward: after several (OFS's one per module) the gradients are
        # averaged here instead, at the last micro-batch of the update
        return super().no_sync(sync and forwards == 1)

    def backward(self, loss: torch.Tensor, sync: bool, forwards: int = 1) -> None:
        super().backward(loss, sync)
        if sync and forwards > 1:
            self.average_gradients()

    def average_gradients(self) -> None:
        """Every gradient the processes hold, averaged over them in one all-reduce (as DDP's own reducer would)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if self.most(len(grads)) != len(grads) or self.most(-len(grads)) != -len(grads):
            raise RuntimeError("DDP: the processes hold gradients for different parameters after the backward")
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat.div_(self.world)
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(averaged)

    def rng_state(self, own: dict) -> dict:
        states = [None] * self.world
        torch.distributed.all_gather_object(states, own)  # their dropout masks differ with their batches
        return {"processes": states}
