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


@dataclass(frozen=True)
class Generation:
    prompt_ids: tuple[int, ...]  # the rendered prompt, without padding
    response_ids: tuple[int, ...]  # generated tokens up to and including the first EOS
    text: str  # the response decoded without special tokens, stripped


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str | list[dict]],
    num_samples: int,
    sampling: SamplingConfig,
    seed: int,
) -> list[list[Generation]]:
    """``num_samples`` generations per prompt; deterministic for a seed (same seed, same model: same text).

    All prompts go in one ``generate`` call (left padding), so callers choose the batch size.
    """
    texts = [render_prompt(tokenizer, p) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=tokenizer.chat_template is None)
    finally:
        tokenizer.padding_side = side
    enc = enc.to(model.device)
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
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
