"""Everyday explainable topics shared by the ``concision`` and ``format`` tasks, split train/eval.

Every 8th topic is held out for eval, so eval prompts never name a training topic.
"""

from __future__ import annotations

from . import split_items

TOPICS = [
    "how a bicycle works", "why the sky is blue", "how to make tea", "the water cycle", "how bees make honey",
    "why we sleep", "how a refrigerator keeps food cold", "the rules of chess", "how to plant a tree",
    "what a volcano is", "how airplanes fly", "why leaves change colour", "how to save money", "the moon's phases",
    "how a library works", "why exercise matters", "how bread rises", "what a rainbow is", "how to tie a knot",
    "the history of the postal service", "how recycling works", "why cats purr", "how a compass works",
    "what photosynthesis is", "how to learn a language", "why the ocean is salty", "how a battery works",
    "the life of a butterfly", "how to brew coffee", "what clouds are made of", "how vaccines work",
    "why we have seasons", "how a camera takes a picture", "the basics of budgeting", "how to care for a houseplant",
    "why bread goes stale", "how trains run on time", "what an earthquake is", "how to write a letter",
    "why birds migrate", "how a microwave heats food", "the rules of football", "how to make a paper plane",
    "what gravity does", "how the heart pumps blood", "why ice floats", "how to pack a suitcase",
    "what a museum does", "how wind turbines make power", "why people yawn", "how to start running",
    "what a map shows", "how cheese is made", "why the sea has tides", "how to clean a window", "what DNA is",
    "how a bill becomes law", "why onions make you cry", "how to plan a picnic", "what a desert is like",
    "how submarines dive", "why music moves us", "how to fold a shirt", "what a glacier is", "how soap cleans",
    "why dogs wag their tails", "how to read a recipe", "what a thunderstorm is", "how an elevator works",
    "why we need water", "how to set up a tent", "what a comet is", "how a lock and key work",
    "why some foods are spicy", "how to make a budget spreadsheet", "what a coral reef is", "how a printer works",
    "why the stars twinkle", "how to prepare for an interview", "what erosion is", "how a thermostat works",
    "why we forget things", "how to grow herbs indoors", "what a black hole is", "how traffic lights work",
    "why salt melts ice", "how to take good notes", "what a rainforest is", "how solar panels work",
    "why popcorn pops", "how to keep a journal", "what a tsunami is", "how glasses help people see",
    "why we dream", "how to make pancakes", "what an atom is", "how the internet sends messages",
    "why apples turn brown", "how to walk a dog", "what a marathon is", "how a piano makes sound",
    "why bubbles are round", "how to sort laundry", "what a fossil is", "how a zipper works",
    "why the desert is cold at night", "how to bake cookies", "what a hurricane is", "how an umbrella works",
    "why we blush", "how to change a light bulb", "what a satellite does", "how yogurt is made",
    "why shadows change length", "how to make a smoothie", "what an island is", "how a smoke detector works",
    "why we shiver", "how to learn to swim", "what a meteor is", "how a hot air balloon flies",
    "why milk is white", "how to organise a desk", "what a canyon is", "how a kite flies",
    "why fireflies glow", "how to write a poem", "what a river delta is", "how a sewing machine works",
]


def split_topics(split: str) -> list[str]:
    return split_items(TOPICS, split)
