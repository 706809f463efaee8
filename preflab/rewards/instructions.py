"""Format gold reward: verifiable instructions in the style of IFEval (Zhou et al., arXiv 2311.07911).

A prompt carries one or two constraints, each stated by one fixed sentence (``CONSTRAINTS`` below). The
reward finds every constraint sentence in the prompt and returns the fraction the response satisfies.
Range [0, 1]. A prompt with no constraint sentence is an error.

Constraints and their checks (``r`` is the response with surrounding whitespace removed):

- ``lowercase``: "Your entire response must be in lowercase letters." → r has a letter and r == r.lower();
- ``keyword``: 'Include the word "K" in your response.' → K appears as a whole word, any case;
- ``bullets``: 'Format your answer as exactly N bullet points starting with "- ".' → exactly N lines of r
  start with "- " or "* " (after indentation);
- ``no_commas``: "Do not use any commas in your response." → no "," in a non-empty r;
- ``end_phrase``: 'End your response with the exact phrase "P".' → r ends with P (trailing punctuation of
  r after P is not allowed);
- ``json_keys``: 'Answer only with a JSON object that has the keys "A" and "B".' → r (optionally inside one
  ``` fence) parses as a JSON object holding both keys;
- ``max_words``: "Use fewer than N words." → 0 < word count < N;
- ``start_word``: 'Start your response with the word "W".' → the first word of r, stripped of
  punctuation, equals W (any case).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from . import register_reward


@dataclass(frozen=True)
class Constraint:
    name: str
    template: str  # str.format template with named parameters
    pattern: re.Pattern  # finds the sentence in a prompt; groups are the parameters
    check: Callable[[str, tuple[str, ...]], bool]


def _words(text: str) -> list[str]:
    return text.split()


def _json_object(text: str) -> dict | None:
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.DOTALL)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


CONSTRAINTS = [
    Constraint("lowercase", "Your entire response must be in lowercase letters.",
               re.compile(r"Your entire response must be in lowercase letters\."),
               lambda r, g: any(c.isalpha() for c in r) and r == r.lower()),
    Constraint("keyword", 'Include the word "{word}" in your response.',
               re.compile(r'Include the word "([^"]+)" in your response\.'),
               lambda r, g: re.search(rf"\b{re.escape(g[0])}\b", r, flags=re.IGNORECASE) is not None),
    Constraint("bullets", 'Format your answer as exactly {n} bullet points starting with "- ".',
               re.compile(r'Format your answer as exactly (\d+) bullet points starting with "- "\.'),
               lambda r, g: sum(bool(re.match(r"\s*[-*] ", line)) for line in r.splitlines()) == int(g[0])),
    Constraint("no_commas", "Do not use any commas in your response.",
               re.compile(r"Do not use any commas in your response\."),
               lambda r, g: bool(r) and "," not in r),
    Constraint("end_phrase", 'End your response with the exact phrase "{phrase}".',
               re.compile(r'End your response with the exact phrase "([^"]+)"\.'),
               lambda r, g: r.endswith(g[0])),
    Constraint("json_keys", 'Answer only with a JSON object that has the keys "{a}" and "{b}".',
               re.compile(r'Answer only with a JSON object that has the keys "([^"]+)" and "([^"]+)"\.'),
               lambda r, g: (obj := _json_object(r)) is not None and g[0] in obj and g[1] in obj),
    Constraint("max_words", "Use fewer than {n} words.",
               re.compile(r"Use fewer than (\d+) words\."),
               lambda r, g: 0 < len(_words(r)) < int(g[0])),
    Constraint("start_word", 'Start your response with the word "{word}".',
               re.compile(r'Start your response with the word "([^"]+)"\.'),
               lambda r, g: bool(_words(r)) and _words(r)[0].strip(".,;:!?\"'*").lower() == g[0].lower()),
]
BY_NAME = {c.name: c for c in CONSTRAINTS}


def constraint_results(prompt: str, response: str) -> dict[str, bool]:
    """Each constraint stated in the prompt → whether the response satisfies it."""
    r = response.strip()
    found = {}
    for c in CONSTRAINTS:
        for match in c.pattern.finditer(prompt):
            found[f"{c.name}:{','.join(match.groups())}"] = bool(c.check(r, match.groups()))
    if not found:
        raise ValueError(f"format reward: the prompt states no checkable constraint: {prompt[:80]!r}")
    return found


@register_reward("format")
class FormatReward:
    name = "format"

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for prompt, response in zip(prompts, responses):
            results = constraint_results(prompt, response)
            out.append(sum(results.values()) / len(results))
        return out
