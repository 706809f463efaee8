"""Export a run's final model as a plain Hugging Face model (adapters merged into the weights)."""

from __future__ import annotations

import logging
from pathlib import Path

from .models.loader import load_model, load_tokenizer, run_model_name

log = logging.getLogger(__name__)


class ExportError(Exception):
    """An export that would overwrite files or mix a merged model with the run's own files."""


def export_run(run_dir: str | Path, out_dir: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write ``run_dir/final`` as a standalone model in ``out_dir`` that ``AutoModelForCausalLM`` loads.

    An adapter is loaded onto the base model named in the run's ``config.yaml`` and merged; a full model
    is re-saved as it is. ``out_dir`` must be new or empty (``overwrite``: replace the files of an earlier export),
    and never the run directory or its ``final/``: a merged model beside the adapter would be loaded with the
    adapter applied a second time.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    final = run_dir / "final"
    if not final.is_dir():
        raise FileNotFoundError(f"export: {final} does not exist (has the run finished?)")
    target = out_dir.resolve()
    if target == run_dir.resolve() or target == final.resolve() or final.resolve() in target.parents:
        raise ExportError(f"export: {out_dir} is the run's own directory; a merged model there would sit beside "
                          f"the adapter of {final} (loaded together, the adapter counts twice): choose another")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"export: {out_dir} is a file, not a directory")
    held = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
        raise ExportError(f"export: {out_dir} is not empty (it holds {shown}); choose a new or empty directory, "
                          "or pass --overwrite to replace an earlier export")
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        base_name = run_model_name(run_dir)
        if base_name is None:
            raise FileNotFoundError(f"export: {run_dir / 'config.yaml'} is missing; it names the base model of the "
                                    "adapter")
        model = PeftModel.from_pretrained(load_model(base_name, dtype), final).merge_and_unload()
    else:
        model = load_model(str(final), dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    load_tokenizer(str(final)).save_pretrained(out_dir)
    log.info("exported %s to %s", final, out_dir)
    return out_dir
