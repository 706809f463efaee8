"""The engine a run is launched under, behind one interface (:class:`Engine`) that the loop calls unconditionally.

``accelerate launch`` tells every process its engine through the environment: ``ACCELERATE_USE_FSDP=true``
(FSDP, accelerate's FSDP2 plugin), ``ACCELERATE_USE_DEEPSPEED=true`` (DeepSpeed ZeRO), neither with several
processes (DDP). On a machine without GPUs accelerate 1.15 builds DDP over gloo only; preflab sets the process state
up so that FSDP2 and DeepSpeed run over gloo too (the CPU tests of those paths).
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType

from .ddp import DdpEngine
from .deepspeed import DeepSpeedEngine, Zero3Engine
from .fsdp import FsdpEngine
from .single import Engine

__all__ = ["DdpEngine", "DeepSpeedEngine", "Engine", "FsdpEngine", "Zero3Engine", "cpu_processes", "launched_engine",
           "make_engine"]


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


def make_engine(**kwargs) -> Engine:
    """The launched engine around the run's ``Accelerator`` (``kwargs``: mixed precision, trackers, project dir)."""
    name = launched_engine()
    if name == "deepspeed":
        if cpu_processes():  # accelerate would count one process: name the gloo group it must join
            PartialState(backend="gloo")
        accelerator = Accelerator(**kwargs)
        stage = accelerator.state.deepspeed_plugin.zero_stage
        return (Zero3Engine if stage == 3 else DeepSpeedEngine)(accelerator, stage)
    if name == "fsdp" and cpu_processes():
        # accelerate builds FSDP only from a GPU process type; the gloo process group serves FSDP2 as it is
        PartialState(cpu=True).distributed_type = DistributedType.MULTI_GPU
    accelerator = Accelerator(cpu=cpu_processes(), **kwargs)
    return {"single": Engine, "ddp": DdpEngine, "fsdp": FsdpEngine}[name](accelerator)
