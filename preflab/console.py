"""What a run prints: the log lines' format, progress bars on a terminal and plain lines everywhere else.

On a terminal (stderr is a TTY) progress is a tqdm bar. Written to a file, a pipe or a CI log it is one plain log
line per step of progress (the training bar: one per logging step, with the step's loss, margin, accuracy and
throughput), and the libraries' own bars (transformers' loading and writing bars, datasets') are switched off: a
file gets no ``\\r``-joined bar text. The CLI and :func:`preflab.train.train` set this up alike
(:func:`setup_logging`), so a run from Python logs the same lines as ``preflab train``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

LOG_FORMAT = "%(levelname)s %(message)s"
NOISY_LOGGERS = ("httpx", "urllib3", "filelock")
log = logging.getLogger("preflab.progress")


def on_terminal() -> bool:
    """Whether stderr (where the bars and the log lines go) is a terminal."""
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def setup_logging(level: int = logging.INFO, cli: bool = False) -> None:
    """The CLI's logging: ``LEVEL message`` lines on stderr, the noisy libraries at WARNING, their bars off
    where stderr is no terminal. The CLI configures the root logger (``logging.basicConfig``); a library run
    (``cli=False``) only gives ``preflab``'s logger a handler, and only where the application has set up no
    logging itself (neither the root logger nor ``preflab``'s has a handler)."""
    root, ours = logging.getLogger(), logging.getLogger("preflab")
    if cli:
        logging.basicConfig(level=level, format=LOG_FORMAT)
    elif not root.handlers and not ours.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        ours.addHandler(handler)
        ours.setLevel(level)
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not on_terminal():
        quiet_library_bars()


def quiet_library_bars() -> None:
    """Switch off transformers', datasets' and the hub's own progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        import datasets
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # pragma: no cover - both are dependencies of transformers/preflab
        return
    datasets.disable_progress_bars()
    disable_progress_bars()


class Lines:
    """A progress bar's interface (``update``, ``set_postfix``, ``close``, iteration) that logs one plain line
    every ``every`` steps and at the last: ``DESC N/TOTAL UNIT: key=value ... (elapsed, about T left)``."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, initial: int,
                 every: int | None):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n = self.start = initial
        self.every = every or max(1, (self.total or 10) // 10)
        self.postfix: dict[str, object] = {}
        self.t0 = time.perf_counter()

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            log.info(self.line())

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        of = f"/{self.total}" if self.total is not None else ""
        values = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        timing = f"{elapsed:.1f} s"
        done = self.n - self.start
        if self.total is not None and 0 < done and self.n < self.total:
            timing += f", about {elapsed / done * (self.total - self.n):.0f} s left"
        return f"{self.desc} {self.n}{of} {self.unit}{': ' + values if values else ''} ({timing})"

    def close(self) -> None:
        pass

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)


class _Off(Lines):
    def update(self, n: int = 1) -> None:
        self.n += n


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str,
             enabled: bool = True, initial: int = 0, every: int | None = None):
    """A tqdm bar on a terminal, :class:`Lines` elsewhere, nothing shown when not ``enabled``."""
    if not enabled:
        return _Off(iterable, total, desc, unit, initial, every)
    if on_terminal():
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit)
    return Lines(iterable, total, desc, unit, initial, every)
