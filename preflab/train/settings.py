"""The ``train`` section of a run config: what the training loop does with batches, steps and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8  # pairs per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_steps: int | None = None  # optimizer steps; overrides epochs
    epochs: float = 1.0
    warmup_ratio: float = 0.1
    lr_scheduler: str = field(default="linear", metadata={"choices": ("linear", "cosine", "constant",
                                                                      "constant_with_warmup")})
    max_grad_norm: float | None = 1.0  # null: no clipping
    precision: str = field(default="fp32", metadata={"choices": ("fp32", "bf16")})
    gradient_checkpointing: bool = False
    logging_steps: int = 1
    eval_steps: int | None = None  # null: evaluate before training and at the end only
    eval_batch_size: int = 16
    save_steps: int | None = None  # null: a checkpoint at the end only
    save_total_limit: int | None = 2  # keep the last N checkpoints; null keeps all
    report_to: tuple[str, ...] = ()  # accelerate trackers, e.g. [tensorboard]
    progress: bool = True
    # a non-finite loss or gradient: stop (error naming step and rows) or skip the update (counted, logged);
    # skip gives up after max_nonfinite_skips skipped steps. A checkpoint never holds a non-finite weight.
    on_nonfinite: str = field(default="stop", metadata={"choices": ("stop", "skip")})
    max_nonfinite_skips: int = 10

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "logging_steps", "eval_batch_size", "max_nonfinite_skips"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "eval_steps", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1 or null, got {value}")
        if self.lr <= 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps is None and self.epochs <= 0:
            raise ValueError(f"epochs: must be > 0, got {self.epochs}")
