"""What a run leaves on disk, written so that a crash leaves nothing half-done, and the policy on resuming.

``config.yaml`` (a resumed run whose config changed keeps the old file), JSON files and model directories written
under a temporary name and renamed into place, and the result a run returns.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ..config import Config, ConfigError, config_changes, dump_config
from .checkpoint import intact_checkpoint, list_checkpoints, verify_checkpoint

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """Training cannot continue (a non-finite loss); the message says at which step and on which rows."""


# the held-out metrics a run's summary shows, with their labels (the CLI's summary and final/'s model card)
HELD_OUT_SUMMARY = (("loss", "loss"), ("rewards/accuracies", "preference accuracy (implicit reward)"),
                    ("pref/logp_accuracy_per_token", "likelihood preference (per token)"),
                    ("rewards/margins", "reward margin"))


def format_metric(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    seconds: float
    before: dict | None
    after: dict | None
    generation: dict | None = None
    table: str | None = None  # a schedule's own summary (cofs: the forgetting matrix)
    nonfinite_skips: int = 0  # updates skipped under train.on_nonfinite=skip (counted among the steps)


def resume_path(config: Config, run_dir: Path) -> Path | None:
    """The checkpoint a run continues from (``resume: auto | never | PATH``); errors before any work."""
    if config.resume == "never":
        if list_checkpoints(run_dir):
            raise ConfigError(f"resume: output_dir {run_dir} already holds checkpoints; use resume=auto to continue "
                              "that run or choose another output_dir")
        return None
    if config.resume == "auto":
        return intact_checkpoint(run_dir)
    path = Path(config.resume)
    if not path.is_dir():
        raise ConfigError(f"resume: checkpoint {path} does not exist")
    verify_checkpoint(path)
    return path


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def write_rows(rows: list[dict], path: Path) -> None:
    """JSONL rows, written under a temporary name and renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)


def record_config(config: Config, run_dir: Path, resumed_at: str | None, finished: bool = False) -> None:
    """Writes config.yaml; a resumed run whose config changed keeps the old file (``config.before-<resumed_at>.yaml``)
    and logs the changes. Where the run directory is (``output_dir``: a moved run) and how it resumes are not
    changes of the run. A ``finished`` run (resumed at its last step) with a changed config is refused: nothing
    would be trained, and config.yaml would no longer describe ``final/`` (``eval`` settings excepted: the evaluation
    after training runs again with them)."""
    path = run_dir / "config.yaml"
    if resumed_at is not None and path.is_file():
        changed = [c for c in config_changes(yaml.safe_load(path.read_text()) or {}, config.to_dict())
                   if not c.startswith(("output_dir:", "resume:", "train.progress:"))]
        if finished and any(not c.startswith("eval.") for c in changed):  # the evaluation after training reruns
            raise ConfigError(f"output_dir: {run_dir} holds a finished run ({resumed_at}) trained with other "
                              f"settings ({'; '.join(changed)}); training it again would change nothing but its "
                              "config.yaml. Train into a new output_dir, or raise train.max_steps to continue it")
        if changed:
            keep = run_dir / f"config.before-{resumed_at}.yaml"
            path.replace(keep)
            log.warning("resuming with a changed config (the old one is kept as %s): %s", keep.name, "; ".join(changed))
    dump_config(config, path)


def save_model_atomically(model: torch.nn.Module, tokenizer, out: Path) -> None:
    """``model`` and ``tokenizer`` in Hugging Face format at ``out``, replacing what was there."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def copy_dir_atomically(src: Path, out: Path) -> None:
    """``out`` becomes a copy of ``src``, written under a temporary name and renamed into place."""
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def flat(tree: dict, prefix: str = "") -> dict:
    """Dotted keys and scalar values: what trackers accept as hyperparameters."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict):
                    out.update(flat(item, f"{prefix}{key}.{i}."))
                else:
                    out[f"{prefix}{key}.{i}"] = item
        else:
            out[f"{prefix}{key}"] = "null" if value is None else value
    return out
