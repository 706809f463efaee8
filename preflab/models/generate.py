"""Batched sampling from a causal LM with ``transformers.generate``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    do_sample: bool = True


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict]) -> str:
    """A user prompt (string or message list) as the text the model continues, via the chat template."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if tokenizer.chat_template is None:
        return "\n".join(m["content"] for m in messages) + "\n"
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _left_padded(tokenizer: PreTrainedTokenizerBase, prompts: list, device) -> dict[str, torch.Tensor]:
    special = tokenizer.chat_template is None
    ids = [list(p) if isinstance(p, tuple) else tokenizer(render_prompt(tokenizer, p), add_special_tokens=special)[
        "input_ids"] for p in prompts]
    width = max(len(i) for i in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, width - len(seq):] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


@dataclass(frozen=True)
class Generation:
    prompt_ids: tuple[int, ...]  # the rendered prompt, without padding
    response_ids: tuple[int, ...]  # generated tokens up to and including the first EOS
    text: str  # the response decoded without special tokens, stripped


def _sample(model, tokenizer, enc: dict, num_samples: int, sampling: SamplingConfig) -> torch.Tensor:
    return model.generate(
        **enc,
        max_new_tokens=sampling.max_new_tokens,
        do_sample=sampling.do_sample,
        temperature=sampling.temperature if sampling.do_sample else None,
        top_p=sampling.top_p if sampling.do_sample else None,
        top_k=None,
        num_return_sequences=num_samples,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str | list[dict] | tuple[int, ...]],
    num_samples: int,
    sampling: SamplingConfig,
    seed: int,
) -> list[list[Generation]]:
    """``num_samples`` generations per prompt; deterministic for a seed (same seed, same model: same text).

    A prompt is a user message (string), a message list, or already-rendered token ids (a tuple). All
    prompts go in one ``generate`` call (left padding), so callers choose the batch size.
    """
    enc = _left_padded(tokenizer, prompts, model.device)
    was_training = model.training
    model.eval()
    # seeded locally: sampling here must not move the global RNG that training (dropout) draws from
    devices = [model.device.index or 0] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        try:
            out = _sample(model, tokenizer, enc, num_samples, sampling)
        finally:
            model.train(was_training)
    width = enc["input_ids"].shape[1]
    results: list[list[Generation]] = []
    for i in range(len(prompts)):
        mask = enc["attention_mask"][i].bool()
        prompt_ids = tuple(enc["input_ids"][i][mask].tolist())
        group = []
        for row in out[i * num_samples:(i + 1) * num_samples]:
            response = row[width:].tolist()
            if tokenizer.eos_token_id in response:
                response = response[: response.index(tokenizer.eos_token_id) + 1]
            text = tokenizer.decode(response, skip_special_tokens=True).strip()
            group.append(Generation(prompt_ids, tuple(response), text))
        results.append(group)
    return results


def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str | list[dict]],
    num_samples: int,
    sampling: SamplingConfig,
    seed: int,
) -> list[list[str]]:
    """The texts of :func:`generate`: ``num_samples`` responses per prompt."""
    return [[g.text for g in group] for group in generate(model, tokenizer, prompts, num_samples, sampling, seed)]
