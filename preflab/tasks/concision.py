"""The ``concision`` task: explain a topic "in about N words"; judged by closeness to N (rewards.concision).

Prompts combine a phrasing template, a topic (topics.py, split by topic) and a target N in 5..30.
"""

from __future__ import annotations

import random

from . import Task, register_task
from .topics import split_topics

_TEMPLATES = [
    "In about {n} words, explain {t}.",
    "Describe {t} in about {n} words.",
    "Tell me {t}, in about {n} words.",
    "Give a summary of {t} in about {n} words.",
]
_TARGETS = [5, 8, 10, 12, 15, 20, 25, 30]


def concision_prompts(split: str, seed: int = 0) -> list[str]:
    prompts = [tpl.format(t=t, n=n) for t in split_topics(split) for tpl in _TEMPLATES for n in _TARGETS]
    random.Random(f"concision-{split}-{seed}").shuffle(prompts)
    return prompts


register_task(Task(name="concision", prompts=concision_prompts, reward="concision"))
