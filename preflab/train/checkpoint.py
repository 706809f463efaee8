"""Checkpoints that lose nothing: everything needed to resume exactly, written atomically.

A checkpoint is a directory ``checkpoints/step-00000042/`` holding

- ``trainable.safetensors``: the tensors training changes (the adapter, or every weight);
- ``optimizer.pt``, ``scheduler.pt``: their ``state_dict`` (under DeepSpeed, ``deepspeed/`` holds the optimizer
  state instead: the engine's own files, every process its partition);
- ``rng.pt``: Python, NumPy and torch (CPU and CUDA) generator states — of every process under DDP
  (``{"processes": [...]}``, one per rank: each process draws its own dropout masks);
- ``state.json``: step, data position, counters;
- ``checksums.json``: the SHA-256 of every other file, so that a file truncated or corrupted later (a full disk, a
  copy cut short, a bad sector) is found before anything is restored from it.

It is written under a temporary name and renamed into place, so a crash during a save leaves the previous
checkpoint intact and no half-written one visible. Only directories with ``state.json`` count. ``resume: auto``
continues from the newest checkpoint that :func:`verify_checkpoint` passes, naming each newer one it skips and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
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
CHECKSUMS_FILE = "checksums.json"
DEEPSPEED_DIR = "deepspeed"  # a checkpoint's DeepSpeed engine files (every process its partition)

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions; the previous one is intact) or read."""


class CheckpointUnreadable(CheckpointError):
    """A file of a checkpoint is missing, truncated or corrupt; the message names it."""


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
        checksums = {}
        for f in sorted(tmp.rglob("*")):  # data on disk before the rename makes it visible
            if f.is_file():
                checksums[f.relative_to(tmp).as_posix()] = _sha256_synced(f)
        (tmp / CHECKSUMS_FILE).write_text(json.dumps(checksums, indent=2) + "\n")
        _sha256_synced(tmp / CHECKSUMS_FILE)
        if final.exists():  # a re-save of the same step (e.g. the end of a finished run resumed)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception):  # a full disk is an OSError, a SafetensorError or torch's RuntimeError
            previous = list_checkpoints(run_dir)
            kept = f"the previous checkpoint {previous[-1].name} is intact" if previous else "no earlier checkpoint"
            raise CheckpointError(f"writing the checkpoint of step {step} in {root} failed ({type(e).__name__}: "
                                  f"{e}); {kept}") from e
        raise
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _sha256_synced(path: Path) -> str:
    """The file's SHA-256, read back once; its data is synced to disk on the way."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
        os.fsync(f.fileno())
    return digest.hexdigest()


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).is_file())


def checkpoint_step(path: Path) -> int:
    """The step a (verified) checkpoint was written at."""
    return int(json.loads((Path(path) / STATE_FILE).read_text())["step"])


def verify_checkpoint(path: Path) -> None:
    """Raises :class:`CheckpointUnreadable`, naming the file, unless every file of the checkpoint at ``path`` is as it
    was written: the checksums match, or (a checkpoint without ``checksums.json``) every file can be read."""
    path = Path(path)
    listed = path / CHECKSUMS_FILE
    if not listed.is_file():
        load_checkpoint(path)
        return
    try:
        checksums = json.loads(listed.read_text())
        if not isinstance(checksums, dict) or STATE_FILE not in checksums:
            raise ValueError(f"expected a file → checksum mapping that lists {STATE_FILE}")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointUnreadable(f"checkpoint {path}: {CHECKSUMS_FILE} is corrupt ({e})") from e
    for name, expected in checksums.items():
        f = path / name
        if not f.is_file():
            raise CheckpointUnreadable(f"checkpoint {path}: {name} is missing")
        if _sha256_synced(f) != expected:
            raise CheckpointUnreadable(f"checkpoint {path}: {name} is truncated or corrupt (its checksum differs "
                                       f"from the one written with it)")
    if "optimizer.pt" not in checksums and not (path / DEEPSPEED_DIR).is_dir():
        raise CheckpointUnreadable(f"checkpoint {path}: optimizer.pt is missing")


def _read(path: Path, name: str, reader):
    try:
        return reader(path / name)
    except Exception as e:  # noqa: BLE001 - whatever the format's reader raises on a damaged file, named
        what = "missing" if not (path / name).exists() else f"unreadable ({type(e).__name__}: {e})"
        raise CheckpointUnreadable(f"checkpoint {path}: {name} is {what}") from e


def _torch(file: Path):
    return torch.load(file, map_location="cpu", weights_only=False)


def load_checkpoint(path: Path) -> dict:
    """The pieces of a checkpoint; optimizer/scheduler/rng states are loaded on the CPU. A missing or damaged file
    raises :class:`CheckpointUnreadable` naming it."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"resume: {path} is not a complete preflab checkpoint (no {STATE_FILE})")
    engine_owned = (path / DEEPSPEED_DIR).is_dir() and not (path / "optimizer.pt").exists()
    return {
        "trainable": _read(path, "trainable.safetensors", load_file),
        "optimizer": None if engine_owned else _read(path, "optimizer.pt", _torch),  # None: deepspeed/ holds it
        "scheduler": _read(path, "scheduler.pt", _torch),
        "rng": _read(path, "rng.pt", _torch),
        "state": _read(path, STATE_FILE, lambda f: json.loads(f.read_text())),
    }


def intact_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run that :func:`verify_checkpoint` passes (``resume: auto``), a warning naming each
    newer one skipped; None without checkpoints. Raises :class:`CheckpointUnreadable` when none is intact."""
    found, skipped = list_checkpoints(run_dir), []
    root = Path(run_dir) / "checkpoints"
    if root.is_dir():
        for incomplete in sorted(p for p in root.iterdir() if p.name.startswith("step-") and p not in found):
            skipped.append(f"{incomplete} has no {STATE_FILE}")
            log.warning("resume: %s; it is not a checkpoint", skipped[-1])
    for path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointUnreadable as e:
            skipped.append(str(e))
            log.warning("resume: %s; trying the checkpoint before it", e)
            continue
        if skipped:
            log.warning("resume: continuing from %s, the newest intact checkpoint", path.name)
        return path
    if found:
        raise CheckpointUnreadable(f"resume: no intact checkpoint in {root}: " + "; ".join(skipped) +
                                   " (move checkpoints/ away to start the run afresh)")
    return None
