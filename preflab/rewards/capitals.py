"""Capitals gold reward: does the response name the right capital before any other capital?

Definition: the prompt asks "What is the capital of COUNTRY?" for a country of ``tasks/capitals_table.py``.
Every accepted spelling of every capital in that table is searched in the response as a whole word, case
insensitive; the reward is 1.0 when the earliest match is a spelling of COUNTRY's capital, else 0.0 (also
for a response naming no capital). Listing several cities therefore earns nothing unless the right one
comes first. Range {0, 1}.
"""

from __future__ import annotations

import re

from ..tasks.capitals_table import CAPITALS
from . import register_reward

QUESTION = re.compile(r"capital (?:city )?of (.+?)\?")
_CITY = re.compile(r"\b(" + "|".join(sorted({re.escape(c) for cs in CAPITALS.values() for c in cs},
                                             key=len, reverse=True)) + r")\b", re.IGNORECASE)
_COUNTRY_OF = {c.lower(): country for country, cs in CAPITALS.items() for c in cs}


def asked_country(prompt: str) -> str:
    match = QUESTION.search(prompt)
    if not match or match.group(1) not in CAPITALS:
        raise ValueError(f"capitals reward: the prompt asks for no known country's capital: {prompt[:80]!r}")
    return match.group(1)


@register_reward("capitals")
class CapitalsReward:
    name = "capitals"

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for prompt, response in zip(prompts, responses):
            country = asked_country(prompt)
            first = _CITY.search(response)
            out.append(float(first is not None and first.group(1).lower() in {c.lower() for c in CAPITALS[country]}))
        return out
