"""Sentiment gold reward: the VADER compound score of the response.

Definition: ``vaderSentiment.SentimentIntensityAnalyzer().polarity_scores(response)["compound"]``, the
normalized sum of the lexicon valences of the response's words after VADER's rules (negation, boosters,
"but", capitals, punctuation). Range [-1, 1]; higher is more positive; an empty response scores 0.
The prompt is ignored.
"""

from __future__ import annotations

from . import register_reward


@register_reward("sentiment")
class SentimentReward:
    name = "sentiment"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(self._analyzer.polarity_scores(r)["compound"]) if r.strip() else 0.0 for r in responses]
