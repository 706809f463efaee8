"""Held-out preference evaluation: the objective, implicit-reward accuracy and likelihood preference.

``rewards/accuracies`` (margin h > 0) is 0 by construction while the policy equals the reference, so the
report adds what a model prefers on its own: ``pref/logp_accuracy`` (logp(y⁺) > logp(y⁻), summed) and
``pref/logp_accuracy_per_token`` (the same per token), which are meaningful before training too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..data.collate import collate_pairs
from ..data.tokenize import TokenizedPair
from ..losses import Objective, PairLogps
from ..models.scorer import SequenceScorer
from ..train.metrics import MetricAccumulator, pair_metrics


@dataclass(frozen=True)
class SequenceLogps:
    """Summed response log-probs and token counts of chosen and rejected, and the log-probs of their pair's shared
    length (LD-DPO's input), each ``(N,)``."""

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    chosen_shared: Tensor
    rejected_shared: Tensor


@torch.no_grad()
def score_pairs(scorer: SequenceScorer, pairs: list[TokenizedPair], batch_size: int, pad_id: int,
                device: torch.device | str = "cpu", layout: str = "padded", pack_tokens: int = 4096) -> SequenceLogps:
    """Scores chosen and rejected of every pair, ``batch_size`` pairs at a time (batched by length) in ``layout``
    (see :mod:`preflab.data.collate`); results in the input order."""
    n = len(pairs)
    columns = torch.zeros(6, n)  # the fields of SequenceLogps
    order = sorted(range(n), key=lambda i: pairs[i].num_tokens)
    for start in range(0, n, batch_size):
        idx = torch.tensor(order[start:start + batch_size])
        batch = collate_pairs([pairs[i] for i in idx.tolist()], pad_id, layout, pack_tokens).to(device)
        logps, counts, shared = (t.float().cpu() for t in scorer(**batch.scorer_inputs()))
        b = len(idx)
        columns[:, idx] = torch.stack([logps[:b], logps[b:], counts[:b], counts[b:], shared[:b], shared[b:]])
    return SequenceLogps(*columns)


def preference_metrics(objective: Objective, policy: SequenceLogps, reference: SequenceLogps) -> dict[str, float]:
    logps = PairLogps(policy.chosen, policy.rejected, reference.chosen, reference.rejected,
                      policy.chosen_tokens, policy.rejected_tokens, policy.chosen_shared, policy.rejected_shared,
                      reference.chosen_shared, reference.rejected_shared)
    acc = MetricAccumulator()
    acc.add(pair_metrics(logps, objective(logps)))
    out = acc.mean()
    out["pref/logp_accuracy"] = (policy.chosen > policy.rejected).float().mean().item()
    per_token = policy.chosen / policy.chosen_tokens > policy.rejected / policy.rejected_tokens
    out["pref/logp_accuracy_per_token"] = per_token.float().mean().item()
    out["num_pairs"] = len(policy.chosen)
    return out
