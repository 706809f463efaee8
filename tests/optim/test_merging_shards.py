"""OnDARE / OnTIES on FSDP shards (``DTensor``) in one process: the task vectors built on the whole weights move to the
shards when the parameters are swapped for them (``move_state_to_shards``, as FsdpEngine.prepare does), and each
shard is merged as the whole tensor — the same steps as on plain tensors (tests/train/test_engines.py runs the same
under 2 FSDP processes)."""

import pytest
import torch
import torch.distributed as dist
from test_merging import _grads, _params, _taus

from preflab.models.shards import move_state_to_shards
from preflab.optim import OnDAREAdamW, OnTIESAdamW


@pytest.fixture
def mesh(monkeypatch):
    from torch.distributed.device_mesh import init_device_mesh

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29531")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("cls", "options"), [
    (OnDAREAdamW, {"reserve_p": 0.5, "alpha": 0.3, "online_step": 2}),
    (OnDAREAdamW, {"reserve_p": 0.5, "alpha": 0.3, "rescale": "l1", "clip": 0.05}),
    (OnTIESAdamW, {"reserve_p": 0.4, "alpha": 0.3, "ties_election": "weighted"}),
    (OnTIESAdamW, {"reserve_p": 0.4, "alpha": 0.3, "rescale": "l1", "alpha_schedule": "lr_ratio"})])
def test_shards_are_merged_as_the_whole_tensors(mesh, cls, options):
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    plain, grads = _params(), _grads(4)
    whole = _params()
    reference = cls(plain, dict(zip(plain, _taus(), strict=True)), lr=0.05, weight_decay=0.1, **options)
    sharded = cls(whole, dict(zip(whole, _taus(), strict=True)), lr=0.05, weight_decay=0.1, **options)
    for group in (*reference.param_groups, *sharded.param_groups):
        group["initial_lr"] = 0.1  # (lr_ratio: α scaled by lr / initial_lr = 0.5)
    shards = [torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])) for p in whole]
    sharded.param_groups[0]["params"] = shards  # what accelerate's FSDP2 prepare does (the state stays behind)
    move_state_to_shards(sharded, whole)
    assert all(isinstance(sharded.state[s]["tau"], DTensor) for s in shards) and not set(whole) & set(sharded.state)
    for step in grads:
        for p, s, g in zip(plain, shards, step, strict=True):
            p.grad, s.grad = g.clone(), distribute_tensor(g.clone(), mesh, [Shard(0)])
        reference.step()
        sharded.step()
        for p, s in zip(plain, shards, strict=True):
            torch.testing.assert_close(s.full_tensor(), p.detach(), rtol=0, atol=1e-12)
    assert not torch.equal(plain[0].detach(), _params()[0])
