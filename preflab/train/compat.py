"""The one table of combinations preflab refuses, with the reason, checked before any work.

Every other combination of objective × parametrization × optimizer × schedule × engine is expected to work (the
composability matrix test trains them). A row names the axes it spans, when it applies (to a config and the engine
it runs under) and the message, which names the key to change; the README's compatibility table is checked
against this table by a test.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..config import Config, ConfigError

ENGINE_LABELS = {"single": "one process", "ddp": "DDP", "fsdp": "FSDP", "deepspeed": "DeepSpeed"}


@dataclass(frozen=True)
class Refusal:
    axes: str  # the components it spans, e.g. "engine × schedule"
    what: str  # the combination, in the README's words
    why: str  # why it cannot make sense or work (the README's column)
    applies: Callable[[Config, str], bool]  # (config, engine name)
    message: Callable[[Config, str], str]


def _sharded(engine: str) -> bool:
    return engine in ("fsdp", "deepspeed")


def _on_sharded(engine: str, reason: str) -> str:
    label = ENGINE_LABELS[engine]
    return f"accelerate {label}: {reason} under {label} (or launch with configs/accelerate/ddp.yaml)"


def _reference_free(config: Config) -> bool:
    from ..losses import loss_registry

    registry = loss_registry()
    return all(registry[term.name].reference_free for term in config.loss)


def _uses_ofs(config: Config) -> bool:
    """The run trains with OFS-DPO: itself, as APO's inner schedule, or in COFS's OFS arms."""
    return (config.schedule == "ofs" or (config.schedule == "apo" and config.apo.inner == "ofs")
            or (config.schedule == "cofs" and config.cofs.arm in ("cofs", "sequential_ofs")))


def continued_adapter(config: Config) -> str | None:
    """The saved adapter the policy continues training (``parametrization.init_adapter``; LoRA and DoRA only)."""
    return getattr(config.parametrization.params, "init_adapter", None)


def _continues_adapter(config: Config) -> bool:
    """The schedule continues a saved adapter itself (the others fold it into the weights: preflab.train.folding)."""
    from .schedules import schedule_registry

    return schedule_registry()[config.schedule].continues_adapter


def _routed_pair(config: Config) -> bool:
    """The parametrization has a fast/slow pair of its own that runs both modules in one routed forward (LoRA)."""
    from ..adapters import parametrization_registry

    return parametrization_registry()[config.parametrization.name].pair is not None


REFUSALS: tuple[Refusal, ...] = (
    Refusal("engine × optimizer", "DeepSpeed × OnDARE, OnTIES",
            "DeepSpeed steps the optimizer on one flat partition per parameter group: no tensor is left whole or "
            "named for its task vector, its mask or its top-k (FSDP shards each tensor apart: it merges them)",
            lambda c, e: e == "deepspeed" and c.optim.name != "adamw",
            lambda c, e: _on_sharded(e, f"optim.name={c.optim.name} merges each tensor's update with its task vector, "
                                        "and DeepSpeed steps the optimizer on flat partitions of all the tensors; "
                                        "use adamw, or launch with configs/accelerate/fsdp.yaml")),
    Refusal("engine × non-finite policy", "DeepSpeed × train.on_nonfinite: skip",
            "DeepSpeed applies the update inside its backward: there is no update left to skip",
            lambda c, e: e == "deepspeed" and c.train.on_nonfinite == "skip",
            lambda c, e: "accelerate DeepSpeed: train.on_nonfinite=skip cannot skip an update that DeepSpeed applies "
                         "inside its backward; use train.on_nonfinite=stop (or launch with another engine)"),
    Refusal("engine × schedule", "DeepSpeed × OFS with ofs.clip_scope per_module",
            "DeepSpeed clips every gradient together inside its step: one norm for both modules",
            lambda c, e: e == "deepspeed" and _uses_ofs(c) and c.ofs.clip_scope == "per_module",
            lambda c, e: "accelerate DeepSpeed: ofs.clip_scope=per_module cannot clip each module apart, DeepSpeed "
                         "clips every gradient together inside its step; use ofs.clip_scope=joint"),
    Refusal("engine × schedule", "FSDP, DeepSpeed × OFS with one forward per module",
            "the pair of two module trees (DoRA, RoPO, full) runs each module's network past the sharded root, which "
            "gathers the shared embeddings and head (tried under FSDP: a DTensor error in the embedding); the LoRA "
            "pair's two separate forwards are not tried, its routed forward runs both in one (DDP averages the "
            "gradients of two forwards itself)",
            lambda c, e: _uses_ofs(c) and _sharded(e) and not (c.ofs.fused_forward and _routed_pair(c)),
            lambda c, e: f"schedule: ofs under {ENGINE_LABELS[e]} needs ofs.fused_forward=true (its gradient reduction "
                         "follows each forward; the routed forward runs both modules in one)"
                         + ("" if _routed_pair(c) else f"; a pair of {c.parametrization.name} runs one forward per "
                                                        "module: use parametrization.kind=lora, or launch with "
                                                        "configs/accelerate/ddp.yaml")),
    Refusal("schedule × parametrization", "OFS fused forward × a pair of any parametrization but LoRA",
            "only the LoRA pair routes both modules through one forward; set ofs.fused_forward=false",
            lambda c, e: _uses_ofs(c) and c.ofs.fused_forward and not _routed_pair(c),
            lambda c, e: f"ofs.fused_forward: both modules in one routed forward is the LoRA pair's; a pair of "
                         f"{c.parametrization.name} runs one forward per module (set ofs.fused_forward=false)"),
    Refusal("schedule × gradient checkpointing", "OFS LoRA pair with two forwards × gradient checkpointing",
            "the recomputation of two separate forwards would not know which module ran",
            lambda c, e: _uses_ofs(c) and c.train.gradient_checkpointing and not c.ofs.fused_forward
            and _routed_pair(c),
            lambda c, e: "schedule: ofs with train.gradient_checkpointing needs ofs.fused_forward=true (the "
                         "recomputation of two separate forwards would not know which module ran)"),
    Refusal("optimizer × parametrization", "OnDARE, OnTIES (adapter_mode full_only) × adapters (LoRA, DoRA, RoPO)",
            "the paper's setting merges full weights: an adapter trains no tensor θ_SFT − θ_base has (continue an SFT "
            "adapter with adapter_mode adapter_space)",
            lambda c, e: c.optim.name != "adamw" and c.optim.params.adapter_mode == "full_only"
            and c.parametrization.name != "full",
            lambda c, e: f"optim: {c.optim.name} with adapter_mode full_only merges full weights only (the paper's "
                         f"setting): parametrization.kind={c.parametrization.name} trains no tensor the task vector "
                         "has; use parametrization.kind=full, or optim.adapter_mode=adapter_space with "
                         "parametrization.init_adapter (θ_SFT an adapter)"),
    Refusal("optimizer × parametrization", "OnDARE, OnTIES (adapter_mode adapter_space) × a policy that continues "
            "no adapter", "τ = φ_SFT − φ_init is taken over the SFT adapter the run continues training",
            lambda c, e: c.optim.name != "adamw" and c.optim.params.adapter_mode == "adapter_space"
            and continued_adapter(c) is None,
            lambda c, e: f"optim: {c.optim.name} with adapter_mode adapter_space continues training the SFT adapter: "
                         "set parametrization.kind=lora (or dora) with parametrization.init_adapter=<the SFT adapter "
                         "directory>"),
    Refusal("optimizer × schedule", "OnDARE, OnTIES (adapter_mode adapter_space) × every schedule but offline",
            "OFS's pair, APO's iterations and COFS's stages train modules of their own over the SFT adapter folded "
            "into the weights: no adapter is continued for τ = φ_SFT − φ_init to act on",
            lambda c, e: c.optim.name != "adamw" and c.optim.params.adapter_mode == "adapter_space"
            and not _continues_adapter(c),
            lambda c, e: f"optim.adapter_mode: adapter_space merges with the SFT adapter the policy continues, and "
                         f"schedule {c.schedule} starts modules of its own (parametrization.init_adapter is folded "
                         "into the weights); use schedule=offline, or optim.name=adamw"),
    Refusal("schedule × objective", "OFS × reference-free objectives",
            "OFS's margins are log-ratios to a reference",
            lambda c, e: _uses_ofs(c) and _reference_free(c),
            lambda c, e: "schedule: ofs needs an objective with a reference (its margins are log-ratios)"),
    Refusal("schedule × parametrization", "COFS factor combination × any parametrization but LoRA",
            "only LoRA has factors; other modules combine through their dense weight change (cofs.combine: dense or "
            "auto)",
            lambda c, e: c.schedule == "cofs" and c.cofs.combine == "factors" and c.parametrization.name != "lora",
            lambda c, e: f"cofs.combine=factors combines LoRA factors; a {c.parametrization.name} module combines "
                         "through its dense weight change (cofs.combine=dense or auto)"),
)


def markdown_table() -> str:
    """The README's table of refused combinations (``tests/train/test_compat.py`` checks the README holds it)."""
    rows = ["| axes | refused | why |", "|---|---|---|"]
    rows += [f"| {r.axes} | {r.what} | {r.why} |" for r in REFUSALS]
    return "\n".join(rows)


def refusal(config: Config, engine: str) -> Refusal | None:
    """The first row of the table that refuses ``config`` under ``engine``, or None."""
    return next((r for r in REFUSALS if r.applies(config, engine)), None)


def check_compatible(config: Config, engine: str | None = None) -> None:
    """A clear error, before any work, for a refused combination of the config and the engine (default: the
    launched one)."""
    from .engine import launched_engine

    engine = engine or launched_engine()
    found = refusal(config, engine)
    if found is not None:
        raise ConfigError(found.message(config, engine))
