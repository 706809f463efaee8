"""A Hugging Face sequence-classification model as a reward (``rm:PATH`` wherever a reward is named).

Definition: the prompt and response are rendered as a user/assistant conversation with the reward model's
chat template (or joined by a newline when it has none); the reward is the model's first logit (the usual
single-output reward head). Range: unbounded reals, in whatever scale the model was trained.
"""

from __future__ import annotations

import torch

from ..models.loader import resolve


class RewardModelReward:
    def __init__(self, name: str, batch_size: int = 16, device: str | torch.device = "cpu", max_length: int = 1024):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        source = resolve(name).source
        self.name = f"rm:{name}"
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(source).to(device).eval()
        if self.model.config.pad_token_id is None:  # the head finds the last real token by the pad id
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.device, self.max_length = batch_size, device, max_length

    def _render(self, prompt: str, response: str) -> str:
        if self.tokenizer.chat_template is None:
            return f"{prompt}\n{response}"
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        texts = [self._render(p, r) for p, r in zip(prompts, responses)]
        out: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length, add_special_tokens=False)
            logits = self.model(**enc.to(self.device)).logits
            out += logits[:, 0].float().cpu().tolist()
        return out
