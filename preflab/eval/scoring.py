"""Batched, gradient-free scoring of many (prompt, response) rows: the one loop every evaluator uses."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.collate import collate_sequences

Rows = list[tuple[tuple[int, ...], tuple[int, ...]]]  # (prompt_ids, response_ids)


@torch.no_grad()
def score_sequences(scorer: nn.Module, rows: Rows, pad_id: int, batch_size: int,
                    device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Summed response log-probs and response token counts of ``rows``, each ``(N,)`` float64 on the CPU.

    ``scorer`` is a :class:`~preflab.models.scorer.SequenceScorer`. Rows are batched by length (less padding
    compute) and the results returned in the input order.
    """
    if not rows:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    logps, counts = [], []
    for start in range(0, len(rows), batch_size):
        batch = collate_sequences([rows[i] for i in order[start:start + batch_size]], pad_id).to(device)
        lp, n, _ = scorer(**batch.scorer_inputs())
        logps.append(lp.double().cpu())
        counts.append(n.double().cpu())
    inverse = torch.empty(len(rows), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(rows))
    return torch.cat(logps)[inverse], torch.cat(counts)[inverse]
