"""Export a run's final model as a plain Hugging Face model (adapters merged into the weights)."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from .models.loader import load_model, load_tokenizer

log = logging.getLogger(__name__)


def export_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    """Write ``run_dir/final`` as a standalone model in ``out_dir`` that ``AutoModelForCausalLM`` loads.

    An adapter is loaded onto the base model named in the run's ``config.yaml`` and merged; a full model
    is re-saved as it is.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    final = run_dir / "final"
    if not final.is_dir():
        raise FileNotFoundError(f"export: {final} does not exist (has the run finished?)")
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        config_path = run_dir / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"export: {config_path} is missing; it names the base model of the adapter")
        base_name = yaml.safe_load(config_path.read_text())["model"]["name"]
        model = PeftModel.from_pretrained(load_model(base_name, dtype), final).merge_and_unload()
    else:
        model = load_model(str(final), dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    load_tokenizer(str(final)).save_pretrained(out_dir)
    log.info("exported %s to %s", final, out_dir)
    return out_dir
