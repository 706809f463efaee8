"""Checkpoints that lose nothing: everything needed to resume exactly, written atomically.

A checkpoint is a directory ``checkpoints/step-00000042/`` holding

- ``trainable.safetensors``: the tensors training changes (the adapter, or every weight);
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict`` (under DeepSpeed, ``deepspeed/`` holds the optimizer
  state instead: the engine's own files, every process its partition);
- ``rng.pt``: Python, NumPy and torch (CPU and CUDA) generator states — of every process under DDP
  (``{"processes": [...]}``, one per rank: each process draws its own dropout masks);
- ``state.json``: step, data position, counters.

It is written under a temporary name and renamed into place, so a crash during a save leaves the previous
checkpoint intact and no half-written one visible. Only directories with ``state.json`` count.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..config import ConfigError

STATE_FILE = "state.json"
DEEPSPEED_DIR = "deepspeed"  # a checkpoint's DeepSpeed engine files (every process its partition)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); the previous one is intact."""


def deepspeed_partitions(path: Path) -> int:
    """How many processes' DeepSpeed optimizer partitions the checkpoint at ``path`` holds (0: none)."""
    return len(list((Path(path) / DEEPSPEED_DIR).glob("state/*optim_states.pt")))


def check_not_deepspeed(path: Path) -> None:
    """A checkpoint written under DeepSpeed does not resume under another engine (its optimizer state is DeepSpeed's,
    partitioned over its processes)."""
    parts = deepspeed_partitions(path)
    if parts:
        raise ConfigError(f"resume: {path} was written under DeepSpeed (its optimizer state is DeepSpeed's, "
                          f"partitioned over {parts} processes); resume it under DeepSpeed with {parts} processes")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """The temporary directory the checkpoint of ``step`` is written into (cleared of saves a crash left behind).
    Engines that write their own part (DeepSpeed, every process its partition) write it here before the commit."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*.tmp-*"):  # left by a process killed mid-save; never a valid checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".step-{step:08d}.tmp-", dir=root))


def commit_checkpoint(tmp: Path, run_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer: dict | None,
                      scheduler: dict, state: dict, keep_last: int | None = None, rng: dict | None = None) -> Path:
    """Writes the rest of the checkpoint of ``step`` into ``tmp`` (``optimizer``: its ``state_dict``, None when the
    engine wrote its own), syncs every file and renames ``tmp`` into place; ``rng`` defaults to this process's
    generator states."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
        if optimizer is not None:
            torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(scheduler, tmp / "scheduler.pt")
        torch.save(rng_state() if rng is None else rng, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
            if f.is_file():
                with f.open("rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():  # a re-save of the same step (e.g. the end of a finished run resumed)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            previous = list_checkpoints(run_dir)
            kept = f"the previous checkpoint {previous[-1].name} is intact" if previous else "no earlier checkpoint"
            raise CheckpointError(f"writing the checkpoint of step {step} in {root} failed ({e}); {kept}") from e
        raise
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file())


def load_checkpoint(path: Path) -> dict:
    """The pieces of a checkpoint; optimizer/scheduler/rng states are loaded on the CPU."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume: {path} is not a complete preflab checkpoint (no {STATE_FILE})")
    return {
        "trainable": load_file(path / "trainable.safetensors"),
        "optimizer": torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        if (path / "optimizer.pt").is_file() else None,  # None: the engine's own files (deepspeed/)
        "scheduler": torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False),
        "rng": torch.load(path / "rng.pt", map_location="cpu", weights_only=False),
        "state": json.loads((path / STATE_FILE).read_text()),
    }
