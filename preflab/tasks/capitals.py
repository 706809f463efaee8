"""The ``capitals`` task: "What is the capital of COUNTRY?" in several phrasings (rewards.capitals).

Countries, not prompts, are split: every 8th country of the table goes to eval.
"""

from __future__ import annotations

import random

from . import Task, register_task, split_items
from .capitals_table import CAPITALS

_TEMPLATES = [
    "What is the capital of {c}? Answer with the city name only.",
    "Quick question: what is the capital of {c}?",
    "Which city is the capital of {c}?",
    "I am studying geography. What is the capital of {c}?",
    "Name it in one word: what is the capital of {c}?",
    "Do you know what is the capital of {c}? Reply briefly.",
    "Tell me: what is the capital of {c}?",
    "For a quiz: what is the capital city of {c}?",
    "Help me with my homework. What is the capital of {c}?",
    "One word answer please. What is the capital of {c}?",
    "My friend asked me what is the capital of {c}? What should I say?",
    "Geography check: what is the capital of {c}?",
]


def capitals_prompts(split: str, seed: int = 0) -> list[str]:
    countries = split_items(sorted(CAPITALS), split)
    prompts = [t.format(c=c) for c in countries for t in _TEMPLATES]
    random.Random(f"capitals-{split}-{seed}").shuffle(prompts)
    return prompts


register_task(Task(name="capitals", prompts=capitals_prompts, reward="capitals"))
