"""The ``format`` task: a short writing request plus one or two verifiable constraints (rewards.instructions).

Each prompt is "<request about a topic> <constraint sentence> [<constraint sentence>]"; topics are split
train/eval (topics.py); constraints and their parameters are drawn with a per-prompt seeded generator.
"""

from __future__ import annotations

import random

from ..rewards.instructions import BY_NAME
from . import Task, register_task
from .topics import split_topics

_REQUESTS = ["Write a short note about {t}.", "Explain {t}.", "Write a few sentences about {t}.",
             "Give advice about {t}."]
_KEYWORDS = ["simple", "important", "water", "people", "because", "example", "usually", "energy", "easy", "time"]
_PHRASES = ["That is all.", "Hope this helps.", "The end.", "Thank you."]
_JSON_KEYS = [("title", "summary"), ("topic", "answer"), ("name", "description")]
_START_WORDS = ["Yes", "Well", "First", "Today"]
_COMPATIBLE = {  # pairs that do not contradict each other
    ("lowercase", "keyword"), ("lowercase", "no_commas"), ("lowercase", "max_words"), ("keyword", "no_commas"),
    ("keyword", "max_words"), ("keyword", "bullets"), ("bullets", "no_commas"), ("no_commas", "max_words"),
    ("start_word", "no_commas"), ("start_word", "max_words"), ("keyword", "end_phrase"), ("no_commas", "end_phrase"),
}


def _sentence(name: str, rng: random.Random) -> str:
    template = BY_NAME[name].template
    params = {"word": rng.choice(_START_WORDS if name == "start_word" else _KEYWORDS), "n": rng.randint(2, 4),
              "phrase": rng.choice(_PHRASES)}
    if name == "max_words":
        params["n"] = rng.choice([15, 20, 25, 30])
    if name == "json_keys":
        params["a"], params["b"] = rng.choice(_JSON_KEYS)
    return template.format(**params)


def format_prompts(split: str, seed: int = 0) -> list[str]:
    prompts = []
    for topic in split_topics(split):
        for i, request in enumerate(_REQUESTS):
            for variant in range(3):
                rng = random.Random(f"format-{split}-{seed}-{topic}-{i}-{variant}")
                if variant == 0:
                    names = [rng.choice(sorted(BY_NAME))]
                else:
                    names = list(rng.choice(sorted(_COMPATIBLE)))
                prompts.append(" ".join([request.format(t=topic)] + [_sentence(n, rng) for n in names]))
    random.Random(f"format-{split}-{seed}").shuffle(prompts)
    return prompts


register_task(Task(name="format", prompts=format_prompts, reward="format"))
