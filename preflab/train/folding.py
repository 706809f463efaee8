"""A saved adapter folded into the weights, for the schedules that start modules of their own.

``parametrization.init_adapter`` names an (SFT) adapter the policy starts from. The offline schedule continues
training that adapter itself (preflab.adapters.lora: the reference is its frozen copy). OFS-DPO's fast/slow pair,
APO's iterations and COFS's stages start modules of their own, so their runs start from the adapter folded into the
weights: ``<output_dir>/start/`` holds ``model.name`` with W + ΔW of the adapter, written once by the main process
(a resumed run reuses it), and the run is the configured one on that model, without ``init_adapter``. Policy and
reference then start as the SFT policy; the run trains its own modules over the folded weights, so an adapter in
``final/`` is an adapter on ``start/`` (APO and COFS export merged weights anyway). ``start/folded.json`` says what
was folded; a run resumed with another model or adapter is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from ..config import Config, ConfigError
from .compat import continued_adapter
from .schedules import schedule_registry

log = logging.getLogger(__name__)

START = "start"  # under the run directory: the starting model with the adapter folded in


def fold_start_adapter(config: Config) -> Config:
    """``config`` itself where nothing is to fold (no ``init_adapter``, or a schedule that continues it); else the
    config of the same run on ``<output_dir>/start/`` (written here unless it is there from before)."""
    adapter = continued_adapter(config)
    if adapter is None or schedule_registry()[config.schedule].continues_adapter:
        return config
    from accelerate import PartialState

    from .engine import cpu_processes

    out = Path(config.output_dir) / START
    origin = {"model": config.model.name, "init_adapter": str(adapter)}
    processes = PartialState(cpu=cpu_processes())
    if processes.is_main_process:
        _write_start(config, out, origin)
    processes.wait_for_everyone()
    params = dataclasses.replace(config.parametrization.params, init_adapter=None)
    return dataclasses.replace(config, model=dataclasses.replace(config.model, name=str(out)),
                               parametrization=dataclasses.replace(config.parametrization, params=params))


def _write_start(config: Config, out: Path, origin: dict) -> None:
    marker = out / "folded.json"
    if marker.is_file():
        before = json.loads(marker.read_text())
        if before != origin:
            raise ConfigError(f"parametrization.init_adapter: {out} holds the start of a run from {before}, not "
                              f"{origin}; train into a new output_dir (or set model.name and init_adapter as before)")
        log.info("parametrization.init_adapter: the run starts from %s (folded before)", out)
        return
    from ..adapters.lora import fold_adapter
    from ..models.loader import load_model, load_tokenizer
    from .outputs import save_model_atomically, write_json

    mc = config.model
    model = fold_adapter(load_model(mc.name, mc.dtype, mc.attn_implementation), config.parametrization.params,
                         use_dora=config.parametrization.name == "dora")
    save_model_atomically(model, load_tokenizer(mc.name), out)
    write_json(marker, origin)  # last: a start without it is folded again
    log.info("parametrization.init_adapter: %s folded into %s's weights at %s (schedule %s starts its own modules "
             "there)", origin["init_adapter"], mc.name, out, config.schedule)
