"""The run configuration: YAML, then dotted command-line overrides, then a typed tree.

``preflab train configs/dpo.yaml train.lr=1e-4 loss.beta=0.2`` reads the YAML into a plain tree,
applies each override to it (``a.b.c=value``; list items by index, ``loss.1.weight=0.1``; values parsed
as YAML), and only then resolves the tree into the dataclasses below. Resolution checks every key, type
and value before any work starts and raises :class:`ConfigError` naming the key, what was expected and,
for an unknown key, the close matches.

Three sections are *components*, chosen by a name and validated against that choice's own dataclass:
``parametrization`` (``kind:``, see :mod:`preflab.adapters`), ``loss`` (``name:``, see :mod:`preflab.losses`; a
single mapping or a list of mappings summed with their ``weight``) and ``optim`` (``name:``, see
:mod:`preflab.optim`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A user-caused configuration problem; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # built-in name, local dir, .gguf file, run dir or hub id
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16", "float16")})
    attn_implementation: str = field(default="sdpa", metadata={"choices": ("sdpa", "eager", "flash_attention_2")})


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
        from .tasks import task_names

        return cls(text, f"builtin:{text}", f"builtin:{text}", task=text if text in task_names() else None)

    def __post_init__(self) -> None:
        from .tasks import task_names

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


@dataclass(frozen=True)
class ScorerConfig:
    chunk_size: int = 256  # response tokens per slice of the vocabulary projection; 0: full logits (slow path)
    # padded: a row per response; shared: a row per pair, the prompt once (prefix sharing); packed: several
    # pairs per row up to pack_tokens (see preflab.data.collate)
    layout: str = field(default="shared", metadata={"choices": ("padded", "shared", "packed")})
    pack_tokens: int = 4096
    # reference log-probs cached per pair and reference model: lazy (filled as pairs are first seen), precompute
    # (all training pairs before the first step), none (a reference forward every step)
    reference_cache: str = field(default="lazy", metadata={"choices": ("lazy", "precompute", "none")})
    reference_cache_dir: str | None = None  # default: $PREFLAB_REFERENCE_CACHE or $PREFLAB_CACHE/reference

    def __post_init__(self) -> None:
        if self.chunk_size < 0:
            raise ValueError(f"chunk_size: must be >= 0, got {self.chunk_size}")
        if self.pack_tokens < 2:
            raise ValueError(f"pack_tokens: must be >= 2, got {self.pack_tokens}")


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
            from .tasks import task_names

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


@dataclass(frozen=True)
class Component:
    """A choice made by name (``key`` is ``kind`` or ``name``) and that choice's validated parameters."""

    key: str
    name: str
    params: Any  # a frozen dataclass instance

    def to_dict(self) -> dict:
        return {self.key: self.name, **_to_plain(self.params)}


@dataclass(frozen=True)
class OfsConfig:
    """Fast-slow chasing (``schedule: ofs``, preflab.train.ofs): two LoRA modules on one base, the leader widening
    its lead and the chaser closing the gap. The spec is ../methods/ofs-cofs.md (Qi et al., arXiv 2406.05534)."""

    alpha: float = 0.1  # weight of the chasing term
    slow_lr_ratio: float = 0.1  # slow module's lr = train.lr × this
    swap_interval: int = 50  # K: optimizer steps per window; the lower mean DPO loss leads
    beta: float | None = None  # β of the chasing term's margins; null: the objective's own (its reward margins)
    # leader | fast | slow at the end; best_val_fast: the fast module at its lowest held-out loss among the
    # evaluations after step 0 (every train.eval_steps and the last step)
    export: str = field(default="leader", metadata={"choices": ("leader", "fast", "slow", "best_val_fast")})
    init_same: bool = True  # both modules start from the same A (and B = 0)
    chase_stopgrad: bool = True  # false: no stop-gradients (the two terms then cancel exactly)
    gap_clamp: float | None = None  # bound on |h_F − h_S| inside the chasing term
    clip_scope: str = field(default="per_module", metadata={"choices": ("per_module", "joint")})
    # one routed forward on the duplicated batch, or one forward per module (faster on CPU: see bench_ofs_step)
    fused_forward: bool = False

    def __post_init__(self) -> None:
        if self.alpha < 0 or self.slow_lr_ratio <= 0 or self.swap_interval < 1:
            raise ValueError(f"alpha >= 0, slow_lr_ratio > 0 and swap_interval >= 1 needed, got {self.alpha}, "
                             f"{self.slow_lr_ratio}, {self.swap_interval}")
        if self.gap_clamp is not None and self.gap_clamp <= 0:
            raise ValueError(f"gap_clamp: must be > 0 or null, got {self.gap_clamp}")


@dataclass(frozen=True)
class CofsConfig:
    """Continual alignment over ``data.domains`` (``schedule: cofs``, preflab.train.cofs). ``arm`` picks COFS-DPO or
    one of its baselines, so that a comparison is one config change. The spec is ../methods/ofs-cofs.md §2."""

    # cofs: OFS per domain, the domains' best fast modules combined; sequential_ofs / sequential_dpo: each domain
    # continues from the previous one's model; joint_dpo: DPO on all domains at once (upper bound)
    arm: str = field(default="cofs", metadata={"choices": ("cofs", "sequential_ofs", "sequential_dpo", "joint_dpo")})
    select: str = field(default="best_val_fast", metadata={"choices": ("best_val_fast", "final_leader", "final_fast")})
    buffer_size: int = 128  # replay pairs kept per domain (uniform sample, seeded)
    replay_in_training: bool = False  # true: a domain also trains on the earlier domains' buffers
    init: str = field(default="from_combined", metadata={"choices": ("from_combined", "fresh")})
    select_metric: str = field(default="dpo_loss", metadata={"choices": ("dpo_loss", "pref_acc")})
    grid_max_domains: int = 3  # up to this many modules: simplex grid; more: projected gradient descent
    grid_step: float = 0.1
    pgd_steps: int = 50
    pgd_lr: float = 0.05
    pgd_optimizer: str = field(default="adam", metadata={"choices": ("adam", "sgd")})  # sgd: plain projected GD

    def __post_init__(self) -> None:
        if self.buffer_size < 1 or self.grid_max_domains < 1 or self.pgd_steps < 1 or self.pgd_lr <= 0:
            raise ValueError("buffer_size, grid_max_domains, pgd_steps: must be >= 1 and pgd_lr > 0")
        n = round(1 / self.grid_step) if self.grid_step > 0 else 0
        if n < 1 or abs(n * self.grid_step - 1) > 1e-9:
            raise ValueError(f"grid_step: must divide 1 (0.1, 0.25, 0.5, ...), got {self.grid_step}")


@dataclass(frozen=True)
class ApoConfig:
    """The iterative schedule (``schedule: apo``, preflab.train.apo): sample → score → pair → train → extrapolate.

    ``alpha: 0`` is plain iterative DPO. The spec is ../methods/apo.md (He et al., arXiv 2410.06293)."""

    iterations: int = 3  # T+1 DPO iterations
    alpha: float = 0.3  # Nesterov extrapolation θ_{t+1} = θ̂_{t+1} + α(θ̂_{t+1} − θ̂_t); 0: iterative DPO
    task: str = "sentiment"  # the prompts sampled each iteration (its train split)
    reward: str | None = None  # judge of the samples: a reward name or rm:PATH; null: the task's gold reward
    prompts_per_iteration: int = 64
    prompt_schedule: str = field(default="disjoint", metadata={"choices": ("disjoint", "reuse")})
    k: int = 5  # samples per prompt; the best and the worst make the pair
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    batch_prompts: int = 16  # prompts per generate call
    min_score_gap: float = 0.0  # drop a prompt when best − worst <= this
    beta: float | tuple[float, ...] | None = None  # per-iteration β (one value or one per iteration); null: the loss's
    epochs_per_iteration: float = 1.0  # inner training (train.max_steps, when set, wins)
    return_extrapolated: bool = False  # also extrapolate after the last iteration and return that
    eval_extrapolated: bool = False  # also run the generation eval on θ_{t+1} (the paper evaluates both)
    # merged: fold θ_t into dense weights each iteration, fresh adapter on top (exact in fp32; needs an
    # unquantized base). The spec's rank-stacking `stacked` realisation is not implemented.
    lora_extrapolation: str = field(default="merged", metadata={"choices": ("merged",)})

    def __post_init__(self) -> None:
        for name in ("iterations", "prompts_per_iteration", "k", "max_new_tokens", "batch_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.k < 2:
            raise ValueError(f"k: must be >= 2 (a pair needs two samples), got {self.k}")
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha: must be in [0, 1), got {self.alpha}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"temperature/top_p: need temperature > 0 and top_p in (0, 1], got {self.temperature}, "
                             f"{self.top_p}")
        if self.epochs_per_iteration <= 0:
            raise ValueError(f"epochs_per_iteration: must be > 0, got {self.epochs_per_iteration}")
        betas = self.beta if isinstance(self.beta, tuple) else ()
        if isinstance(self.beta, tuple) and len(betas) != self.iterations:
            raise ValueError(f"beta: expected one value or {self.iterations} (one per iteration), got {len(betas)}")
        if any(b <= 0 for b in betas) or (isinstance(self.beta, float) and self.beta <= 0):
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        from .tasks import task_names

        if self.task not in task_names():
            raise ValueError(f"task: unknown task {self.task!r}; expected one of {task_names()}")

    def beta_at(self, iteration: int) -> float | None:
        """β of iteration ``iteration`` (0-based); None: keep the objective's."""
        return self.beta[iteration] if isinstance(self.beta, tuple) else self.beta


@dataclass(frozen=True)
class Config:
    output_dir: str = "runs/dpo"
    seed: int = 0
    resume: str = "auto"  # auto: continue from the run directory's last checkpoint; never; or a checkpoint path
    schedule: str = field(default="offline", metadata={"choices": ("offline", "apo", "ofs", "cofs")})  # the outer loop
    model: ModelConfig = field(default_factory=ModelConfig)
    parametrization: Component = field(default=None)  # type: ignore[assignment]
    loss: tuple[Component, ...] = ()
    data: DataConfig = field(default_factory=DataConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)  # generation-based evaluation
    diag: DiagConfig = field(default_factory=DiagConfig)  # 3D-properties diagnostics
    optim: Component = field(default=None)  # type: ignore[assignment]  # optim.name: the optimizer and its settings
    apo: ApoConfig = field(default_factory=ApoConfig)  # schedule: apo
    ofs: OfsConfig = field(default_factory=OfsConfig)  # schedule: ofs (and cofs's OFS arms)
    cofs: CofsConfig = field(default_factory=CofsConfig)  # schedule: cofs

    def to_dict(self) -> dict:
        return _to_plain(self)


# ----------------------------------------------------------------------------------------------------------
# Components: the registries the names resolve against.


def _component_registries() -> dict[str, tuple[str, dict[str, type], Any]]:
    from .adapters import parametrization_registry
    from .losses import loss_registry
    from .optim import optimizer_registry

    params = {k: v.params for k, v in parametrization_registry().items()}
    losses = {k: v.hparams for k, v in loss_registry().items()}
    optimizers = {k: v.settings for k, v in optimizer_registry().items()}
    return {"parametrization": ("kind", params, {"kind": "lora"}),
            "loss": ("name", losses, {"name": "sigmoid"}),
            "optim": ("name", optimizers, {"name": "adamw"})}


def _resolve_component(raw: Any, path: str, key: str, registry: dict[str, type]) -> Component:
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with a {key!r} key, got {_show(raw)}")
    raw = dict(raw)
    if key not in raw:
        raise ConfigError(f"{path}.{key}: missing; expected one of {sorted(registry)}")
    name = raw.pop(key)
    if not isinstance(name, str):
        raise ConfigError(f"{path}.{key}: expected a name, one of {sorted(registry)}; got {_show(name)}")
    if name not in registry:
        raise ConfigError(f"{path}.{key}: unknown {key} {name!r}; expected one of {sorted(registry)}"
                          + _suggest(str(name), registry))
    return Component(key, name, _build(registry[name], raw, path))


# ----------------------------------------------------------------------------------------------------------
# Generic resolution of a plain tree into dataclasses.


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, path)
            except ConfigError as e:
                errors.append(str(e))
        raise errors[0] if len(errors) == 1 else ConfigError(f"{path}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str) and args[-1] is Ellipsis:
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list ({_type_name(tp)}), got {_show(value)}")
        if args[-1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}.{i}") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        return tuple(_coerce(v, a, f"{path}.{i}") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise ConfigError(f"{path}: expected true or false, got {_show(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected an integer, got {_show(value)}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {_show(value)}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{path}: expected a string, got {_show(value)}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and hasattr(tp, "from_str"):
            try:
                return tp.from_str(value)
            except ValueError as e:
                raise ConfigError(f"{path}.{e}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {_show(value)}")
        return _build(tp, value, path)
    raise TypeError(f"config type {tp!r} at {path} is not supported")  # a bug in preflab, not user input


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _build(cls: type, raw: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields_ = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields_:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(f"{where}: unknown key; valid keys here: {sorted(fields_)}" + _suggest(str(key), fields_))
    kwargs = {}
    for name, value in raw.items():
        where = f"{path}.{name}" if path else name
        value = _coerce(value, hints[name], where)
        choices = fields_[name].metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{where}: expected one of {list(choices)}, got {value!r}"
                              + _suggest(str(value), choices))
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ValueError as e:  # __post_init__ checks name the field first: "beta: must be > 0"
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None


def resolve(raw: dict) -> Config:
    """A typed :class:`Config` from a plain tree (YAML + overrides)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {_show(raw)}")
    raw = dict(raw)
    components = {}
    for section, (key, registry, default) in _component_registries().items():
        value = raw.pop(section, None) or dict(default)
        if section == "loss":
            terms = value if isinstance(value, list) else [value]
            if not terms:
                raise ConfigError("loss: expected at least one term")
            path = (lambda i: f"loss.{i}") if isinstance(value, list) else (lambda i: "loss")
            components[section] = tuple(_resolve_component(t, path(i), key, registry) for i, t in enumerate(terms))
        else:
            components[section] = _resolve_component(value, section, key, registry)
    config = _build(Config, raw, "")
    return dataclasses.replace(config, **components)


# ----------------------------------------------------------------------------------------------------------
# YAML and overrides.


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: malformed key {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_override(tree: dict, keys: list[str], value: Any) -> None:
    node: Any = tree
    for depth, key in enumerate(keys[:-1]):
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            node = node[_index(node, key, where)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: cannot set a sub-key of a {type(node).__name__}")
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
    last = keys[-1]
    if isinstance(node, list):
        node[_index(node, last, ".".join(keys))] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ConfigError(f"{'.'.join(keys[:-1])}: cannot set a sub-key of a {type(node).__name__}")


def _index(node: list, key: str, where: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ConfigError(f"{where}: expected an index in [0, {len(node)}) of a list of {len(node)}")
    return int(key)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level, got {type(tree).__name__}")
    return tree


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """YAML file (or defaults when ``path`` is None) + ``key.sub=value`` overrides → typed config."""
    tree = load_yaml(path) if path is not None else {}
    for section, (_, _, default) in _component_registries().items():
        if tree.get(section) is None:  # so that "loss.beta=0.2" works without a loss section
            tree[section] = dict(default)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
    return resolve(tree)


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, Component):
        return obj.to_dict()
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def dump_config(config: Config, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    tmp.replace(path)


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config trees, as ``key: old -> new``."""
    out = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b, path = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out
