"""Examples to token ids: chat templates, the prompt/response boundary, EOS, truncation.

- Conversational examples are rendered with the tokenizer's chat template. The response is the text the
  template adds after the prompt rendered with ``add_generation_prompt``; it ends with the template's
  end-of-turn token (the EOS of chat models), and template whitespace after that token is dropped (a
  model stops generating at EOS, so it never produces it).
- Standard (string) examples are used as they are, with the tokenizer's special tokens, and the EOS token
  is appended to each response that lacks it.
- The prompt is tokenized on its own (chosen and rejected share it); the response comes from the joint
  tokenization of prompt + response. When the prompt's tokens are not a prefix of it (a token merged characters
  across the boundary), the response characters in that token are tokenized on their own and the joint tokens
  follow (counted as ``boundary_mismatch``): the scored sequence always decodes to exactly the prompt followed
  by the response, no character dropped or scored twice.
- ``max_prompt_length`` truncates the prompt (from the left by default: the end of a prompt is what the
  response answers); ``max_length`` then truncates each response from the right.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from .formats import Example, RowError


@dataclass(frozen=True)
class TokenizedPair:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    where: str = field(default="", compare=False)
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def num_tokens(self) -> int:
        """Tokens as TRL counts them: prompt + chosen + prompt + rejected."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


class PairTokenizer:
    """Callable turning an :class:`Example` into a :class:`TokenizedPair`; counts what it had to change."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int = 512,
                 max_prompt_length: int | None = 256, prompt_truncation: str = "left"):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.prompt_truncation = prompt_truncation
        self.counts = {"truncated_prompt": 0, "truncated_response": 0, "boundary_mismatch": 0}

    def render(self, example: Example) -> tuple[str, str, str, bool]:
        """Prompt text, chosen text, rejected text, and whether the tokenizer adds its special tokens."""
        tok = self.tokenizer
        if not example.conversational:
            eos = tok.eos_token or ""
            with_eos = [r if r.endswith(eos) else r + eos for r in (example.chosen, example.rejected)]
            return example.prompt, with_eos[0], with_eos[1], True
        if tok.chat_template is None:
            raise RowError(example.where, "prompt", "conversational data needs a tokenizer with a chat template")
        prompt_text = tok.apply_chat_template(example.prompt, tokenize=False,
                                              add_generation_prompt=example.prompt[-1]["role"] != "assistant")
        responses = []
        for name, response in (("chosen", example.chosen), ("rejected", example.rejected)):
            full = tok.apply_chat_template(example.prompt + response, tokenize=False)
            if not full.startswith(prompt_text):
                raise RowError(example.where, name, "the chat template renders the prompt differently inside the "
                                                    "full conversation; cannot find where the response starts")
            text = full[len(prompt_text):]
            if tok.eos_token and tok.eos_token in text:
                cut = text.rindex(tok.eos_token) + len(tok.eos_token)
                if not text[cut:].strip():
                    text = text[:cut]
            responses.append(text)
        return prompt_text, responses[0], responses[1], False

    def _response_ids(self, prompt_text: str, prompt_ids: list[int], response_text: str, special: bool) -> list[int]:
        """Token ids of the response such that ``prompt_ids + ids`` decodes to exactly prompt + response.

        They are the joint tokenization's tokens after the prompt's own tokens when the prompt is a prefix of it.
        Otherwise a token merged characters across the boundary: the joint tokens from the first one that starts
        inside the response are kept, and the response characters before it (those the straddling token also held)
        are tokenized on their own, so that no character is scored twice or lost. Where even that does not decode
        back to the response (a tokenizer that is not byte-exact at that cut), the response is tokenized alone."""
        tok = self.tokenizer
        alone = lambda text: tok(text, add_special_tokens=False)["input_ids"] if text else []
        if not tok.is_fast:
            return alone(response_text)
        joint = tok(prompt_text + response_text, add_special_tokens=special, return_offsets_mapping=True)
        ids = joint["input_ids"]
        if ids[: len(prompt_ids)] == prompt_ids:
            return ids[len(prompt_ids):]
        self.counts["boundary_mismatch"] += 1
        cut, spans = len(prompt_text), joint["offset_mapping"]
        first = next((i for i, (start, end) in enumerate(spans) if start >= cut and end > start), len(ids))
        start = spans[first][0] if first < len(ids) else cut + len(response_text)
        ids = alone(response_text[: start - cut]) + ids[first:]
        if tok.decode(ids, clean_up_tokenization_spaces=False) != response_text:
            ids = alone(response_text)
        return ids

    def __call__(self, example: Example) -> TokenizedPair:
        prompt_text, chosen_text, rejected_text, special = self.render(example)
        prompt_ids = self.tokenizer(prompt_text, add_special_tokens=special)["input_ids"]
        responses = [self._response_ids(prompt_text, prompt_ids, t, special) for t in (chosen_text, rejected_text)]
        for name, ids in zip(("chosen", "rejected"), responses):
            if not ids:
                raise RowError(example.where, name, "response has no tokens after tokenization")
        limit = min(self.max_prompt_length or self.max_length, self.max_length - 1)
        if len(prompt_ids) > limit:
            self.counts["truncated_prompt"] += 1
            prompt_ids = prompt_ids[-limit:] if self.prompt_truncation == "left" else prompt_ids[:limit]
        room = self.max_length - len(prompt_ids)
        if any(len(ids) > room for ids in responses):
            self.counts["truncated_response"] += 1
            responses = [ids[:room] for ids in responses]
        return TokenizedPair(tuple(prompt_ids), tuple(responses[0]), tuple(responses[1]), example.where, example.extra)
