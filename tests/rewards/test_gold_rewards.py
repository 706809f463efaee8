"""Every gold reward on hand-made examples, including the edge cases: empty, unicode, very long."""

import pytest

from preflab.rewards import get_reward
from preflab.rewards.instructions import constraint_results

LONG = "word " * 20000


def score(name, prompt, response):
    return get_reward(name)([prompt], [response])[0]


def test_sentiment():
    assert score("sentiment", "any", "I love it, wonderful!") > 0.5
    assert score("sentiment", "any", "Terrible, awful food.") < -0.5
    assert score("sentiment", "any", "") == 0.0 and score("sentiment", "any", "   \n") == 0.0
    assert score("sentiment", "any", "C'est très bien 😀 — naïve café") == pytest.approx(
        score("sentiment", "other prompt", "C'est très bien 😀 — naïve café"))  # unicode is fine, prompt ignored
    assert -1.0 <= score("sentiment", "any", LONG + " great") <= 1.0


@pytest.mark.parametrize("response,expected", [
    ("one two three four five six seven eight nine ten", 1.0),  # exactly N = 10
    ("one two three four five", 0.5),  # |5 - 10| / 10
    ("", 0.0),
    (" ".join(["w"] * 15), 0.5),
    (" ".join(["w"] * 20), 0.0),
    ("ünïcödé wörds ✓ → count as words too yes indeed", 1.0),  # 10 whitespace-separated words
    (LONG, 0.0),
])
def test_concision(response, expected):
    assert score("concision", "Describe tea in about 10 words.", response) == pytest.approx(expected)


def test_concision_needs_a_target():
    with pytest.raises(ValueError, match="word target"):
        score("concision", "Describe tea.", "x")


@pytest.mark.parametrize("prompt,response,expected", [
    ("Explain tea. Your entire response must be in lowercase letters.", "tea is a drink.", 1.0),
    ("Explain tea. Your entire response must be in lowercase letters.", "Tea is a drink.", 0.0),
    ("Explain tea. Your entire response must be in lowercase letters.", "", 0.0),
    ('Explain tea. Include the word "water" in your response.', "Boil WATER first.", 1.0),
    ('Explain tea. Include the word "water" in your response.', "Boil waterfalls.", 0.0),
    ('Explain tea. Format your answer as exactly 3 bullet points starting with "- ".', "- a\n- b\n  * c", 1.0),
    ('Explain tea. Format your answer as exactly 3 bullet points starting with "- ".', "- a\n- b", 0.0),
    ("Explain tea. Do not use any commas in your response.", "Tea is good", 1.0),
    ("Explain tea. Do not use any commas in your response.", "Tea, is good", 0.0),
    ('Explain tea. End your response with the exact phrase "That is all.".', "Tea. That is all.", 1.0),
    ('Explain tea. End your response with the exact phrase "That is all.".', "That is all. Tea.", 0.0),
    ('Explain tea. Answer only with a JSON object that has the keys "title" and "summary".',
     '```json\n{"title": "Tea", "summary": "A drink"}\n```', 1.0),
    ('Explain tea. Answer only with a JSON object that has the keys "title" and "summary".', '{"title": "Tea"}', 0.0),
    ('Explain tea. Answer only with a JSON object that has the keys "title" and "summary".', "[1, 2]", 0.0),
    ("Explain tea. Use fewer than 5 words.", "Tea is nice.", 1.0),
    ("Explain tea. Use fewer than 5 words.", LONG, 0.0),
    ('Explain tea. Start your response with the word "Well".', "Well, tea is nice.", 1.0),
    ('Explain tea. Start your response with the word "Well".', "Tea is nice. Well.", 0.0),
    # two constraints: the reward is the fraction satisfied
    ("Explain tea. Do not use any commas in your response. Use fewer than 5 words.", "Tea, nice.", 0.5),
    ("Explain tea. Your entire response must be in lowercase letters. Do not use any commas in your response.",
     "ünïcödé tea ✓", 1.0),
])
def test_format(prompt, response, expected):
    assert score("format", prompt, response) == pytest.approx(expected)


def test_format_needs_a_constraint():
    with pytest.raises(ValueError, match="no checkable constraint"):
        score("format", "Explain tea.", "x")
    assert len(constraint_results('Include the word "a" in your response. Use fewer than 9 words.', "a b")) == 2


@pytest.mark.parametrize("response,expected", [
    ("Paris", 1.0), ("The capital of France is Paris.", 1.0), ("paris!", 1.0), ("Lyon, then Paris", 1.0),
    ("Rome. No wait, Paris.", 0.0), ("", 0.0), ("I do not know. 🤷", 0.0), ("Parisian food", 0.0),
    (LONG + " Paris", 1.0),
])
def test_capitals(response, expected):
    assert score("capitals", "What is the capital of France?", response) == expected


def test_capitals_accepts_every_spelling_and_rejects_unknown_countries():
    assert score("capitals", "What is the capital of Brazil?", "It is Brasília.") == 1.0
    with pytest.raises(ValueError, match="no known country"):
        score("capitals", "What is the capital of Atlantis?", "x")


def test_batched_call_matches_single_calls():
    reward = get_reward("format")
    prompts = ["Explain tea. Use fewer than 5 words.", "Explain tea. Do not use any commas in your response."]
    responses = ["Tea is nice.", "Tea, is good"]
    assert reward(prompts, responses) == [reward([p], [r])[0] for p, r in zip(prompts, responses)]


def test_unknown_reward():
    with pytest.raises(KeyError, match="unknown name"):
        get_reward("nope")
