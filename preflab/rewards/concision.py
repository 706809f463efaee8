"""Concision gold reward: how close the response's word count is to the target the prompt states.

Definition: the prompt contains "in about N words" (case-insensitive); ``w`` = number of
whitespace-separated words of the response; reward = ``max(0, 1 − |w − N| / N)``. Range [0, 1]; 1 at
exactly N words, 0 at zero words or at 2N words and beyond. A prompt without a target is an error.
"""

from __future__ import annotations

import re

from . import register_reward

TARGET = re.compile(r"in about (\d+) words", re.IGNORECASE)


def target_words(prompt: str) -> int:
    match = TARGET.search(prompt)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"concision reward: the prompt states no word target ('in about N words'): {prompt[:80]!r}")
    return int(match.group(1))


@register_reward("concision")
class ConcisionReward:
    name = "concision"

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for prompt, response in zip(prompts, responses):
            n = target_words(prompt)
            out.append(max(0.0, 1.0 - abs(len(response.split()) - n) / n))
        return out
