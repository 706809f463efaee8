"""Shared fixtures: a real tokenizer (SmolLM2's) and tiny random Llama models built from a config in code."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# reference log-probs cached by a test run stay with it (child processes inherit the variable) and go with it
_REFERENCE_CACHE = None
if "PREFLAB_REFERENCE_CACHE" not in os.environ:
    _REFERENCE_CACHE = tempfile.mkdtemp(prefix="preflab-reference-")
    os.environ["PREFLAB_REFERENCE_CACHE"] = _REFERENCE_CACHE


def pytest_sessionfinish(session, exitstatus):
    if _REFERENCE_CACHE is not None:
        shutil.rmtree(_REFERENCE_CACHE, ignore_errors=True)
# at most 2 threads, or OMP_NUM_THREADS (tools/mutation.sh runs each mutant's tests in a forked single-thread worker)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


def tiny_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


@pytest.fixture(scope="session")
def tokenizer():
    from preflab.models.loader import DEFAULT_MODEL, load_tokenizer

    return load_tokenizer(DEFAULT_MODEL)


def make_tiny_model(tokenizer, seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tokenizer), **overrides))
    model.config.attn_implementation = "sdpa"
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with the SmolLM2 tokenizer, saved in Hugging Face format."""
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    return str(path)


def sentiment_rows(n: int, offset: int = 0) -> list[dict]:
    """Small synthetic conversational pairs: a positive chosen, a negative rejected."""
    good = ["I loved it, wonderful.", "Great value and friendly staff.", "Excellent, would go again.",
            "A delightful experience."]
    bad = ["Terrible, never again.", "Awful service and cold food.", "Boring and far too long.",
           "A waste of money."]
    rows = []
    for i in range(offset, offset + n):
        rows.append({"prompt": [{"role": "user", "content": f"Review item number {i}."}],
                     "chosen": [{"role": "assistant", "content": good[i % 4]}],
                     "rejected": [{"role": "assistant", "content": bad[(i // 4) % 4]}]})
    return rows


def train_until_killed(config, step: int, monkeypatch) -> None:
    """Runs ``train(config)`` and kills it (KeyboardInterrupt) once it has finished ``step`` optimizer steps."""
    from preflab.train import TrainingRun, train

    original = TrainingRun.optimizer_step

    def killed(self):
        if self.state["step"] == step:
            raise KeyboardInterrupt("simulated kill")
        return original(self)

    monkeypatch.setattr(TrainingRun, "optimizer_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(TrainingRun, "optimizer_step", original)


def prepare_probe(probe, reference, tokenizer, chunk_size: int, cache=None) -> None:
    """A 3D probe prepared as one process prepares it: sampled (or read from ``cache``) from ``reference`` (a
    context that yields the model), then scored under it."""
    from contextlib import contextmanager

    from preflab.models.scorer import SequenceScorer

    @contextmanager
    def scorer():
        with reference() as model:
            yield SequenceScorer(model, chunk_size)

    rows = probe.sample(reference, tokenizer, cache) if probe.samples else None
    probe.prepare(scorer(), "cpu", rows)
