"""The ``data`` section of a run config: training and held-out pairs, lengths, errors, domains."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DomainConfig:
    """One domain of a multi-domain schedule (``data.domains``): its own training and held-out pairs, and the task
    whose gold reward scores it. A plain string ``NAME`` means ``builtin:NAME`` for both splits and task ``NAME``."""

    name: str
    train: str
    eval: str | None = None
    train_split: str = "train"
    eval_split: str = "eval"
    task: str | None = None  # generation eval of the domain (gold reward); null: held-out preference accuracy only

    @classmethod
    def from_str(cls, text: str) -> DomainConfig:
        from ..tasks import task_names

        return cls(text, f"builtin:{text}", f"builtin:{text}", task=text if text in task_names() else None)

    def __post_init__(self) -> None:
        from ..tasks import task_names

        if self.task is not None and self.task not in task_names():
            raise ValueError(f"task: unknown task {self.task!r}; expected one of {task_names()}")


@dataclass(frozen=True)
class DataConfig:
    train: str = "builtin:sentiment"  # builtin:NAME, a .jsonl/.json/.csv/.parquet file, a dataset dir, a hub name
    eval: str | None = "builtin:sentiment"  # held-out pairs; null for none
    train_split: str = "train"  # for builtin sets, dataset dirs and hub datasets
    eval_split: str = "eval"
    max_length: int = 512  # prompt + response tokens
    max_prompt_length: int | None = 256
    prompt_truncation: str = field(default="left", metadata={"choices": ("left", "right")})  # left keeps the end
    on_error: str = field(default="strict", metadata={"choices": ("strict", "skip")})
    max_train_pairs: int | None = None  # first N rows only (after validation)
    max_eval_pairs: int | None = None
    domains: tuple[DomainConfig, ...] = ()  # ordered domains of schedule: cofs (train/eval above are then unused)

    def __post_init__(self) -> None:
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise ValueError(f"domains: names must differ, got {names}")
        if self.max_length < 2:
            raise ValueError(f"max_length: must be >= 2, got {self.max_length}")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(f"max_prompt_length: must be in [1, max_length={self.max_length}), got "
                             f"{self.max_prompt_length}")
