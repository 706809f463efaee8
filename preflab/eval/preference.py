"""Held-out preference evaluation: the objective, implicit-reward accuracy and likelihood preference.

``rewards/accuracies`` (margin h > 0) is 0 by construction while the policy equals the reference, so the
report adds what a model prefers on its own: ``pref/logp_accuracy`` (logp(y⁺) > logp(y⁻), summed) and
``pref/logp_accuracy_per_token`` (the same per token), which are meaningful before training too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.tokenize import TokenizedPair
from ..losses import Objective, PairLogps
from ..models.scorer import SequenceScorer
from ..train.metrics import MetricAccumulator, pair_metrics
from .scoring import score_sequences


@dataclass(frozen=True)
class SequenceLogps:
    """Summed response log-probs and token counts of chosen and rejected, each ``(N,)``."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor


def score_pairs(scorer: SequenceScorer, pairs: list[TokenizedPair], batch_size: int, pad_id: int,
                device: torch.device | str = "cpu") -> SequenceLogps:
    """Scores chosen and rejected of every pair; ``batch_size`` counts pairs (two rows each)."""
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    logps, counts = score_sequences(scorer, rows, pad_id, 2 * batch_size, device)
    n = len(pairs)
    return SequenceLogps(logps[:n].float(), logps[n:].float(), counts[:n].float(), counts[n:].float())


def preference_metrics(objective: Objective, policy: SequenceLogps, reference: SequenceLogps) -> dict[str, float]:
    logps = PairLogps(policy.chosen, policy.rejected, reference.chosen, reference.rejected,
                      policy.chosen_tokens, policy.rejected_tokens)
    acc = MetricAccumulator()
    acc.add(pair_metrics(logps, objective(logps)))
    out = acc.mean()
    out["pref/logp_accuracy"] = (policy.chosen > policy.rejected).float().mean().item()
    per_token = policy.chosen / policy.chosen_tokens > policy.rejected / policy.rejected_tokens
    out["pref/logp_accuracy_per_token"] = per_token.float().mean().item()
    out["num_pairs"] = len(policy.chosen)
    return out
