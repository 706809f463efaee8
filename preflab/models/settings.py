"""The ``model`` and ``scorer`` sections of a run config: which model, and how sequences are scored."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    name: str = "smollm2-135m-instruct"  # built-in name, local dir, .gguf file, run dir or hub id
    dtype: str = field(default="float32", metadata={"choices": ("float32", "bfloat16", "float16")})
    attn_implementation: str = field(default="sdpa", metadata={"choices": ("sdpa", "eager", "flash_attention_2")})


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
