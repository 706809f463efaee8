"""The ``eval`` (generation-based evaluation) and ``diag`` (3D diagnostics) sections of a run config."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GenerationEvalConfig:
    task: str | None = None  # a task name (sentiment, concision, format, capitals); null: no generation eval
    num_prompts: int = 100  # first N held-out prompts of the task
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 0
    batch_size: int = 32
    bootstrap: int = 1000  # resamples for the 95% interval

    def __post_init__(self) -> None:
        for name in ("num_prompts", "max_new_tokens", "batch_size", "bootstrap"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.task is not None:
            from ..tasks import task_names

            if self.task not in task_names():
                raise ValueError(f"task: unknown task {self.task!r}; expected one of {task_names()}")


@dataclass(frozen=True)
class DiagConfig:
    """3D-properties diagnostics on fixed sets (see preflab.eval.diagnostics); sized for a GPU by default."""

    enabled: bool = True
    probe_every: int | None = None  # steps between probes; null: every logging step
    seen_pairs: int = 128  # fixed, seeded subset of training pairs
    probe_kind: str = field(default="reference_samples",
                            metadata={"choices": ("reference_samples", "cross_prompt", "none")})
    probe_prompts: int = 64  # held-out prompts the reference samples probe responses for
    probe_samples: int = 2
    probe_max_new_tokens: int = 256
    probe_temperature: float = 1.0
    window: int = 3  # probes the P1/P2 flags look back over
    # hyperspherical energy of the effective weights (preflab.eval.energy), any parametrization
    he_every: int | None = None  # steps between measurements; null: with every 3D probe; 0: off
    he_modules: tuple[str, ...] = ("q_proj", "v_proj")
    he_chunk: int = 1024  # rows per block of the pairwise distances

    def __post_init__(self) -> None:
        if self.he_every is not None and self.he_every < 0:
            raise ValueError(f"he_every: must be >= 0 or null, got {self.he_every}")
        for name in ("seen_pairs", "he_chunk", "probe_prompts", "probe_samples", "probe_max_new_tokens", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.probe_every is not None and self.probe_every < 1:
            raise ValueError(f"probe_every: must be >= 1 or null, got {self.probe_every}")
