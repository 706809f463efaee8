"""The run configuration: YAML, then dotted command-line overrides, then a typed tree.

``preflab train configs/dpo.yaml train.lr=1e-4 loss.beta=0.2`` reads the YAML into a plain tree, applies each
override to it (``a.b.c=value``; list items by index, ``loss.1.weight=0.1``; values parsed as YAML; both in
:mod:`preflab.config_tree`), and only then resolves the tree into the dataclasses below. Resolution checks every
key, type and value before any work starts and raises :class:`ConfigError` naming the key, what was expected and,
for an unknown key, the close matches.

Three sections are *components*, chosen by a name and validated against that choice's own dataclass:
``parametrization`` (``kind:``, see :mod:`preflab.adapters`), ``loss`` (``name:``, see :mod:`preflab.losses`; a
single mapping or a list of mappings summed with their ``weight``) and ``optim`` (``name:``, see
:mod:`preflab.optim`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import logging
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config_tree import ConfigError, apply_override, load_yaml, parse_override
from .data.settings import DataConfig, DomainConfig
from .eval.settings import DiagConfig, GenerationEvalConfig
from .models.settings import ModelConfig, ScorerConfig
from .train.settings import TrainConfig

__all__ = ["Component", "Config", "ConfigError", "DataConfig", "DiagConfig", "DomainConfig", "GenerationEvalConfig",
           "ModelConfig", "ScorerConfig", "TrainConfig", "changes_from_defaults", "config_changes", "dump_config",
           "load_config", "resolve"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Component:
    """A choice made by name (``key`` is ``kind`` or ``name``) and that choice's validated parameters."""

    key: str
    name: str
    params: Any  # a frozen dataclass instance

    def to_dict(self) -> dict:
        return {self.key: self.name, **_to_plain(self.params)}


@dataclass(frozen=True)
class Config:
    """A run: its top-level keys, the core sections, the components chosen by name (parametrization, loss, optim) and
    the settings of every registered schedule (``config.ofs``, ``config.apo``: a section named after its schedule)."""

    output_dir: str = "runs/dpo"
    seed: int = 0
    resume: str = "auto"  # auto: continue from the run directory's last checkpoint; never; or a checkpoint path
    schedule: str = "offline"  # the outer loop: a registered schedule (preflab.train.schedules)
    model: ModelConfig = field(default_factory=ModelConfig)
    parametrization: Component = field(default=None)  # type: ignore[assignment]
    loss: tuple[Component, ...] = ()
    data: DataConfig = field(default_factory=DataConfig)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)  # generation-based evaluation
    diag: DiagConfig = field(default_factory=DiagConfig)  # 3D-properties diagnostics
    optim: Component = field(default=None)  # type: ignore[assignment]  # optim.name: the optimizer and its settings
    sections: dict = field(default_factory=dict, compare=False)  # schedule name -> its settings (every schedule)
    used_sections: tuple[str, ...] = ()  # the sections this run's schedule reads (what to_dict writes)

    def __getattr__(self, name: str):
        sections = self.__dict__.get("sections") or {}
        if name in sections:
            return sections[name]
        raise AttributeError(f"{type(self).__name__} has no attribute or schedule section {name!r}")

    def with_section(self, name: str, settings) -> Config:
        """A copy whose section ``name`` (a schedule's settings) is ``settings``."""
        return dataclasses.replace(self, sections={**self.sections, name: settings})

    def with_schedule(self, name: str) -> Config:
        """A copy run under schedule ``name`` (sections kept; the ones it reads are the ones written)."""
        return dataclasses.replace(self, schedule=name, used_sections=_used_sections(name, self.sections))

    def to_dict(self) -> dict:
        out = {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)
               if f.name not in ("sections", "used_sections")}
        out.update({name: _to_plain(self.sections[name]) for name in self.used_sections})
        return out


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
                errors.append(e)
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
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" as a string
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):  # nan or inf is no setting (null is "none" where allowed)
            return number
        raise ConfigError(f"{path}: expected a {'finite ' if number is not None else ''}number, got {_show(value)}")
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
            doc = (cls.__doc__ or "").strip()
            valid = f"valid keys here: {sorted(fields_)}" if fields_ else "this section has none"
            if not fields_ and doc.startswith("("):  # the settings' own word on where its knobs are
                valid += " " + doc.replace("``", "")
            raise ConfigError(f"{where}: unknown key; {valid}" + _suggest(str(key), fields_))
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


def _schedules() -> dict:
    from .train.schedules import schedule_registry

    return schedule_registry()


def _used_sections(schedule: str, sections: dict) -> tuple[str, ...]:
    """The schedule's section and the ones it reads (sections with no settings are not written)."""
    schedules = _schedules()
    names = (schedule, *schedules[schedule].uses(sections))
    return tuple(n for n in dict.fromkeys(names) if dataclasses.fields(schedules[n].settings))


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
    schedules = _schedules()
    schedule = raw.get("schedule", "offline")
    if not isinstance(schedule, str) or schedule not in schedules:
        raise ConfigError(f"schedule: expected one of {sorted(schedules)}, got {_show(schedule)}"
                          + _suggest(str(schedule), schedules))
    given = {name: raw.pop(name) for name in schedules if name in raw}
    sections = {}
    for name, spec in schedules.items():
        value = given.get(name)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {_show(value)}")
        sections[name] = _build(spec.settings, value or {}, name)
    used = _used_sections(schedule, sections)
    unused = [name for name in given if name not in used and given[name]]
    if unused:
        raise ConfigError(f"{unused[0]}: settings of schedule {unused[0]}, which schedule {schedule} does not read; "
                          f"remove them or set schedule={unused[0]}")
    for internal in ("sections", "used_sections"):  # fields of the typed tree, not keys of a config file
        if internal in raw:
            raise ConfigError(f"{internal}: unknown key; a schedule's settings are a section named after it")
    config = _build(Config, raw, "")
    return dataclasses.replace(config, sections=sections, used_sections=used, **components)


# ----------------------------------------------------------------------------------------------------------
# Loading (the tree from config_tree, then resolution), dumping and comparing.


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """YAML file (or defaults when ``path`` is None) + ``key.sub=value`` overrides → typed config."""
    tree = load_yaml(path) if path is not None else {}
    for section, (_, _, default) in _component_registries().items():
        if tree.get(section) is None:  # so that "loss.beta=0.2" works without a loss section
            tree[section] = dict(default)
    given = copy.deepcopy(tree)
    overridden = []
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(tree, keys, value)
        overridden.append(tuple(keys))
    _drop_settings_of_the_other_choice(given, tree, overridden)
    return resolve(tree)


def _drop_settings_of_the_other_choice(given: dict, tree: dict, overridden: list[tuple[str, ...]]) -> None:
    """``parametrization.kind=ropo`` on a LoRA recipe switches the component: the recipe's settings that the new
    choice does not have (LoRA's ``r``) are dropped with a note. A setting given on the command line is kept, so a
    wrong one is still refused by name."""
    registries = _component_registries()
    for keys in overridden:
        if keys[0] not in registries or keys[-1] != registries[keys[0]][0] or len(keys) not in (2, 3):
            continue  # not a component's name: parametrization.kind, optim.name, loss.name or loss.1.name
        key, choices = registries[keys[0]][:2]
        before, after = _node(given, keys[:-1]), _node(tree, keys[:-1])
        if not isinstance(before, dict) or not isinstance(after, dict) or before.get(key) == after.get(key):
            continue
        if not isinstance(after.get(key), str) or after[key] not in choices:
            continue  # resolution names the unknown choice
        valid = {f.name for f in dataclasses.fields(choices[after[key]])}
        dropped = [k for k in after if k != key and k not in valid and (*keys[:-1], k) not in overridden]
        for k in dropped:
            del after[k]
        if dropped:
            where = ".".join(keys)
            log.warning("%s=%s: the config's settings of %s %s (%s) do not apply to %s and are dropped", where,
                        after[key], key, before.get(key), ", ".join(dropped), after[key])


def _node(tree: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if isinstance(tree, list) and key.isdigit() and int(key) < len(tree):
            tree = tree[int(key)]
        elif isinstance(tree, dict):
            tree = tree.get(key)
        else:
            return None
    return tree


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
    """Dotted keys whose values differ between two plain config trees, as ``key: old -> new`` (lists of mappings of
    the same length, the loss terms, key by key: ``loss.0.beta``)."""
    out = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b, path = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
                isinstance(x, dict) for x in a + b):
            a, b = dict(zip(map(str, range(len(a))), a)), dict(zip(map(str, range(len(b))), b))
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, path + ".")
        elif a != b:
            out.append(f"{path}: {a!r} -> {b!r}")
    return out


def changes_from_defaults(config: Config) -> list[str]:
    """What a config sets that the defaults do not: its schedule and components where they are not the default
    choices, then every setting against the defaults of its own choices (``preflab config --changed``)."""
    default = load_config(None, [])
    out = [f"schedule: {default.schedule!r} -> {config.schedule!r}"] if config.schedule != default.schedule else []
    for section in ("parametrization", "optim"):
        a, b = getattr(default, section), getattr(config, section)
        if a.name != b.name:
            out.append(f"{section}.{b.key}: {a.name!r} -> {b.name!r}")
    names = [[t.name for t in c.loss] for c in (default, config)]
    if names[0] != names[1]:
        out.append(f"loss: {' + '.join(names[0])} -> {' + '.join(names[1])}")
    param, optim = config.parametrization, config.optim
    choices = [f"schedule={config.schedule}", f"parametrization.{param.key}={param.name}",
               f"optim.{optim.key}={optim.name}", "loss=" + json.dumps([{t.key: t.name} for t in config.loss])]
    return out + config_changes(load_config(None, choices).to_dict(), config.to_dict())
