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


@torch.no_grad()
def sample_responses(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str | list[dict]],
    num_samples: int,
    sampling: SamplingConfig,
    seed: int,
) -> list[list[str]]:
    """``num_samples`` responses per prompt, decoded without special tokens; deterministic for a seed.

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
    model.train(was_training)
    new = out[:, enc["input_ids"].shape[1]:]
    decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
    decoded = [d.strip() for d in decoded]
    return [decoded[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]
