"""What keeps a run from losing work: graceful stop on SIGINT/SIGTERM, and a disk check before training.

- :class:`StopRequest` turns the first SIGINT or SIGTERM into a request: the loop finishes the step in
  progress, writes a checkpoint and raises :class:`TrainingInterrupted` (the CLI exits with 128 + signal
  number). A second signal acts as it normally would (Ctrl-C twice aborts at once).
- :func:`check_writable` refuses a run directory that cannot be written, before any work;
  :func:`check_disk_space` refuses to start when the output disk cannot hold one checkpoint.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class TrainingInterrupted(RuntimeError):
    """Stopped by a signal after a finished, checkpointed step; rerunning the same command resumes."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, during: str | None = None):
        self.exit_code = 128 + signum
        where = f"checkpoint {checkpoint}" if checkpoint else "no step had finished, nothing to save" if step == 0 \
            else "no new checkpoint"
        when = f"during {during} at step {step}" if during else f"after step {step}"
        super().__init__(f"stopped by {signal.Signals(signum).name} {when} ({where}); rerun the same command to "
                         "resume")


class StopRequest:
    """Context manager: while active, SIGINT/SIGTERM set :attr:`signum` instead of ending the process."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        log.warning("%s received: finishing the current step, then writing a checkpoint (send it again to abort "
                    "at once)", signal.Signals(signum).name)
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


def checkpoint_bytes(trainable: dict[str, torch.Tensor], optimizer) -> int:
    """An estimate of one checkpoint: the trainable tensors, Adam's two fp32 moments, and any task vectors."""
    weights = sum(t.numel() * t.element_size() for t in trainable.values())
    moments = 2 * 4 * sum(t.numel() for t in trainable.values())
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
    extra = inner.task_vector_bytes() if hasattr(inner, "task_vector_bytes") else 0
    return weights + moments + extra


def check_writable(run_dir: Path) -> None:
    """Refuses a run directory that cannot be written (read-only, not a folder, no permission) before any work: a
    test file is written in it, or in the nearest folder above it that exists (nothing is created)."""
    from ..config import ConfigError

    where = Path(run_dir).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        if not where.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(where))
        fd, probe = tempfile.mkstemp(prefix=".preflab-write-test-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"output_dir: {run_dir} cannot be written ({e.strerror or e}: {where})") from None


def check_disk_space(run_dir: Path, needed: int) -> None:
    from ..config import ConfigError

    free = shutil.disk_usage(run_dir).free
    if free < 1.05 * needed:
        raise ConfigError(f"output_dir: {run_dir} has {free / 2**30:.2f} GiB free, one checkpoint needs about "
                          f"{needed / 2**30:.2f} GiB (trainable weights and optimizer state); free some space or "
                          "choose another output_dir")
