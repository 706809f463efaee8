"""The ``sentiment`` task: review-style prompts, judged by the VADER compound score (positive preferred).

Prompts combine a phrasing template with a reviewable subject. Subjects, not prompts, are split between
train and eval (every 8th subject of each category goes to eval), so held-out prompts name things never
seen in training. Order within a split is a seeded shuffle.
"""

from __future__ import annotations

import random

from . import Task, register_task, split_items

_TEMPLATES = [
    "Write a short review of {s}.",
    "Give your honest opinion of {s} in a few sentences.",
    "Describe your experience with {s}.",
    "What did you think of {s}? Answer briefly.",
    "Write a customer review of {s}.",
    "Tell a friend what {s} was like.",
    "Summarize what you liked and disliked about {s}.",
    "Write two sentences reviewing {s}.",
    "How would you rate {s}? Explain in a few words.",
    "Post a quick online review of {s}.",
    "Share your impressions of {s}.",
    "Would you recommend {s}? Say why.",
]

_SUBJECTS = {
    "film": [
        "the movie Inception", "a slow-paced art-house drama", "the latest superhero sequel",
        "a low-budget horror film", "a romantic comedy set in Rome", "a three-hour historical epic",
        "an animated film about talking cars", "a documentary about deep-sea fish", "a remake of a 1980s classic",
        "a spy thriller with a twist ending", "a musical about a small-town baker", "a silent black-and-white film",
        "a space western", "a courtroom drama", "a zombie comedy", "a film adaptation of a video game",
        "a biopic about a jazz pianist", "a heist movie set in Monaco", "a coming-of-age indie film",
        "a disaster movie about a volcano", "a martial arts film", "a psychological thriller",
        "a Christmas family movie", "a war film told from two sides",
    ],
    "restaurant": [
        "a pizza place downtown", "a sushi bar near the station", "a vegan cafe", "a steakhouse chain",
        "a food truck selling tacos", "a French bistro", "an all-you-can-eat buffet", "a ramen shop",
        "a hotel breakfast buffet", "a rooftop cocktail bar", "a family-run Indian restaurant",
        "a fast-food burger joint", "a seafood shack by the harbour", "a Michelin-starred tasting menu",
        "an airport sandwich shop", "a Korean barbecue restaurant", "a neighbourhood bakery",
        "a university canteen", "a Greek taverna", "a doughnut shop", "a tea house", "a brunch spot",
        "a hospital cafeteria", "a Mexican cantina",
    ],
    "book": [
        "the novel Dune", "a self-help book about habits", "a cookbook of weeknight dinners",
        "a thousand-page fantasy novel", "a biography of a chess champion", "a poetry collection",
        "a mystery novel set on a train", "a children's picture book about a bear", "a history of the printing press",
        "a graphic novel about a heist", "a travel memoir about Patagonia", "a textbook on statistics",
        "a romance novel", "a science fiction short story collection", "a guide to growing tomatoes",
        "a philosophy book for beginners", "a true-crime book", "a book of crossword puzzles",
        "a thriller by a debut author", "an audiobook narrated by its author", "a novel told in letters",
        "a popular-science book about sleep", "a manga series", "a book about the history of jazz",
    ],
    "hotel": [
        "a budget hotel in Paris", "a beach resort", "a mountain lodge", "a hostel in Berlin",
        "a business hotel near the airport", "a bed and breakfast in the countryside", "a capsule hotel",
        "a luxury spa hotel", "a motel off the highway", "a treehouse rental", "a cruise ship cabin",
        "a campsite by a lake", "a boutique hotel in Lisbon", "a ski chalet", "a holiday apartment by the sea",
        "a castle hotel in Scotland", "a guesthouse in Kyoto", "a casino hotel", "a farm stay",
        "an overnight train sleeper cabin", "a houseboat", "a glamping tent", "a conference hotel",
        "a desert eco-lodge",
    ],
    "product": [
        "a pair of wireless earbuds", "a coffee maker", "a robot vacuum cleaner", "a budget smartphone",
        "a mechanical keyboard", "an electric toothbrush", "a standing desk", "a fitness tracker",
        "a cast-iron pan", "a rain jacket", "a pair of running shoes", "an air fryer", "a smart speaker",
        "a kids' scooter", "a camping stove", "an e-reader", "a blender", "a gaming mouse",
        "a suitcase with spinner wheels", "a desk lamp", "a winter sleeping bag",
        "a pair of noise-cancelling headphones",
        "a portable charger", "an office chair",
    ],
    "place": [
        "a hiking trail", "a city museum", "a public library", "a water park", "a zoo", "a botanical garden",
        "a shopping mall", "a national park", "a local gym", "a ski resort", "a bowling alley",
        "a science centre", "an amusement park", "a farmers' market", "a concert hall", "a beach",
        "a city aquarium", "a climbing gym", "a cinema", "an art gallery", "a theme restaurant",
        "a public swimming pool", "a historic lighthouse", "a night market",
    ],
    "show": [
        "a sci-fi TV series", "a cooking competition show", "a true-crime podcast", "a stand-up comedy special",
        "a reality dating show", "a nature documentary series", "a sitcom about office workers",
        "a fantasy TV series", "a late-night talk show", "a detective series", "a history podcast",
        "a children's cartoon", "a music festival", "a theatre play", "a ballet performance",
        "an opera", "a magic show", "a circus", "a rock concert", "a jazz club evening", "an escape room",
        "a quiz show", "a video game", "a board game",
    ],
    "service": [
        "a bank's mobile app", "a ride-sharing service", "an internet provider", "a car rental company",
        "a moving company", "a food delivery app", "a dentist's office", "a hair salon", "a plumber",
        "an online language course", "a yoga class", "a city bus service", "a dry cleaner", "a bike repair shop",
        "a parcel delivery service", "a streaming service", "a phone carrier", "a driving school",
        "a pet grooming service", "a tax advisor", "a cleaning service", "a photo printing service",
        "a coworking space", "a flight with a budget airline",
    ],
}


def _split_subjects(split: str) -> list[str]:
    out = []
    for subjects in _SUBJECTS.values():
        out += split_items(subjects, split)
    return out


def sentiment_prompts(split: str, seed: int = 0) -> list[str]:
    """All prompts of a split (``train`` or ``eval``), in a seeded order; the splits share no subject."""
    prompts = [t.format(s=s) for s in _split_subjects(split) for t in _TEMPLATES]
    random.Random(f"sentiment-{split}-{seed}").shuffle(prompts)
    return prompts


register_task(Task(name="sentiment", prompts=sentiment_prompts, reward="sentiment"))
