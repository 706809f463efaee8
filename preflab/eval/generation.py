"""Judge a policy by what it generates: gold reward, win rate and KL against the reference, length, diversity.

On the held-out prompts of a task, the policy and the reference each sample one response per prompt with
the same seeds (so a policy equal to the reference produces the very same text). Reported:

- ``gold/reward``: mean gold reward of the policy's responses, with a bootstrap 95% interval
  (``gold/reward_ci_low|high``), and ``gold/reward_ref`` of the reference's;
- ``gold/win_rate``: fraction of prompts where the policy's response scores higher than the reference's,
  ties counted half;
- ``gold/kl``: Monte-Carlo estimate of KL(policy ‖ reference) = mean over the policy's samples of
  ``log π(y|x) − log π_ref(y|x)`` (sequence sums);
- ``gen/length_tokens``, ``gen/length_words``, ``gen/distinct1``, ``gen/distinct2`` (unique word n-grams /
  all word n-grams over all responses), and the same under ``ref/`` for the reference.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
from torch import nn

from ..config import GenerationEvalConfig
from ..models.generate import Generation, SamplingConfig, generate
from ..models.scorer import SequenceScorer
from ..tasks import get_task
from .scoring import score_sequences


def _sampling(cfg: GenerationEvalConfig) -> SamplingConfig:
    return SamplingConfig(cfg.max_new_tokens, cfg.temperature, cfg.top_p, do_sample=not cfg.greedy)


def distinct_n(texts: list[str], n: int) -> float:
    grams = [tuple(words[i:i + n]) for words in (t.lower().split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def bootstrap_interval(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(resamples, len(values)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def win_rate(policy_rewards: np.ndarray, reference_rewards: np.ndarray) -> float:
    return float(np.mean((policy_rewards > reference_rewards) + 0.5 * (policy_rewards == reference_rewards)))


def _sample_all(model: nn.Module, tokenizer, prompts: list[str], cfg: GenerationEvalConfig) -> list[Generation]:
    out: list[Generation] = []
    for b, start in enumerate(range(0, len(prompts), cfg.batch_size)):
        groups = generate(model, tokenizer, prompts[start:start + cfg.batch_size], 1, _sampling(cfg),
                          seed=cfg.seed * 1_000_003 + b)
        out += [g[0] for g in groups]
    return out


def _sequence_logps(model: nn.Module, gens: list[Generation], pad_id: int, batch_size: int) -> np.ndarray:
    rows = [(g.prompt_ids, g.response_ids) for g in gens]
    return score_sequences(SequenceScorer(model), rows, pad_id, batch_size, next(model.parameters()).device)[0].numpy()


def _text_stats(gens: list[Generation], prefix: str) -> dict[str, float]:
    texts = [g.text for g in gens]
    return {f"{prefix}/length_tokens": float(np.mean([len(g.response_ids) for g in gens])),
            f"{prefix}/length_words": float(np.mean([len(t.split()) for t in texts])),
            f"{prefix}/distinct1": distinct_n(texts, 1), f"{prefix}/distinct2": distinct_n(texts, 2)}


class GenerationEvaluator:
    """Evaluates policies of one task against one reference; the reference's samples are computed once."""

    def __init__(self, tokenizer, cfg: GenerationEvalConfig):
        if cfg.task is None:
            raise ValueError("generation evaluation needs a task")
        self.tokenizer, self.cfg = tokenizer, cfg
        task = get_task(cfg.task)
        self.prompts = task.prompts("eval", 0)[: cfg.num_prompts]
        self.reward = task.make_reward()
        self._reference: tuple[list[Generation], np.ndarray] | None = None

    def _rewards(self, gens: list[Generation]) -> np.ndarray:
        return np.asarray(self.reward(self.prompts, [g.text for g in gens]), dtype=np.float64)

    def evaluate(self, policy: nn.Module, reference: Callable[[], AbstractContextManager[nn.Module]]) -> dict:
        """``reference()`` yields the reference module (e.g. the policy with its adapter disabled)."""
        cfg, pad = self.cfg, self.tokenizer.pad_token_id
        if self._reference is None:
            with reference() as ref:
                ref_gens = _sample_all(ref, self.tokenizer, self.prompts, cfg)
            self._reference = (ref_gens, self._rewards(ref_gens))
        ref_gens, ref_rewards = self._reference
        gens = _sample_all(policy, self.tokenizer, self.prompts, cfg)
        rewards = self._rewards(gens)
        was_training = policy.training
        policy.eval()
        try:
            logp_policy = _sequence_logps(policy, gens, pad, cfg.batch_size)
            with reference() as ref:
                logp_ref = _sequence_logps(ref, gens, pad, cfg.batch_size)
        finally:
            policy.train(was_training)
        low, high = bootstrap_interval(rewards, cfg.bootstrap, cfg.seed)
        result = {"task": cfg.task, "num_prompts": len(self.prompts), "greedy": cfg.greedy,
                  "gold/reward": float(rewards.mean()), "gold/reward_ci_low": low, "gold/reward_ci_high": high,
                  "gold/reward_ref": float(ref_rewards.mean()), "gold/win_rate": win_rate(rewards, ref_rewards),
                  "gold/kl": float(np.mean(logp_policy - logp_ref)),
                  **_text_stats(gens, "gen"), **_text_stats(ref_gens, "ref")}
        result["examples"] = [{"prompt": p, "policy": g.text, "policy_reward": float(r), "reference": rg.text,
                               "reference_reward": float(rr)}
                              for p, g, r, rg, rr in list(zip(self.prompts, gens, rewards, ref_gens, ref_rewards))[:5]]
        return result


def format_table(result: dict) -> str:
    rows = [("gold reward", f"{result['gold/reward_ref']:.4f}",
             f"{result['gold/reward']:.4f} [{result['gold/reward_ci_low']:.4f}, {result['gold/reward_ci_high']:.4f}]"),
            ("win rate vs reference", "0.5 (itself)", f"{result['gold/win_rate']:.4f}"),
            ("KL(policy || reference)", "0", f"{result['gold/kl']:.4f}")]
    for key, label in (("length_tokens", "length (tokens)"), ("length_words", "length (words)"),
                       ("distinct1", "distinct-1"), ("distinct2", "distinct-2")):
        rows.append((label, f"{result['ref/' + key]:.4f}", f"{result['gen/' + key]:.4f}"))
    lines = [f"generation eval: task {result['task']}, {result['num_prompts']} held-out prompts",
             f"  {'metric':28s} {'reference':>14s}   policy"]
    lines += [f"  {name:28s} {ref:>14s}   {pol}" for name, ref, pol in rows]
    return "\n".join(lines)
