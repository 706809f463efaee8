"""Token sequences to padded batches for the scorer: one row per (prompt, response), right padding.

Position ``t`` of a row predicts token ``t+1`` (``target_ids``) and counts toward output sequence
``target_seq[t]`` (its row) when token ``t+1`` is a response token, else −1. See
:mod:`preflab.models.scorer`. A :class:`PreferenceBatch` of ``B`` pairs holds pair ``i``'s prompt + chosen
in row ``i`` and its prompt + rejected in row ``B + i``.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from .tokenize import TokenizedPair


@dataclass
class SequenceBatch:
    input_ids: Tensor  # (S, T)
    attention_mask: Tensor  # (S, T)
    target_ids: Tensor  # (S, T)
    target_seq: Tensor  # (S, T), -1 = not scored
    num_tokens: int  # prompt + response tokens, summed over rows (TRL's count for pairs)

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0]

    def scorer_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "target_ids": self.target_ids,
                "target_seq": self.target_seq, "num_sequences": self.num_sequences}

    def to(self, device):
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})


@dataclass
class PreferenceBatch(SequenceBatch):
    num_pairs: int = 0  # rows [0, B) are chosen, [B, 2B) rejected


def collate_sequences(rows: list[tuple[tuple[int, ...], tuple[int, ...]]], pad_id: int) -> SequenceBatch:
    """``rows`` of ``(prompt_ids, response_ids)``; only response tokens are scored."""
    width = max(len(prompt) + len(response) for prompt, response in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    target_ids = torch.zeros((n, width), dtype=torch.long)
    target_seq = torch.full((n, width), -1, dtype=torch.long)
    for row, (prompt, response) in enumerate(rows):
        ids = torch.tensor(tuple(prompt) + tuple(response), dtype=torch.long)
        length, start = len(ids), len(prompt)
        input_ids[row, :length] = ids
        attention_mask[row, :length] = 1
        target_ids[row, : length - 1] = ids[1:]
        # positions start-1 .. length-2 predict the response tokens (with no prompt, the first is unscorable)
        target_seq[row, max(start, 1) - 1: length - 1] = row
    return SequenceBatch(input_ids, attention_mask, target_ids, target_seq,
                         sum(len(p) + len(r) for p, r in rows))


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> PreferenceBatch:
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    batch = collate_sequences(rows, pad_id)
    return PreferenceBatch(**{f.name: getattr(batch, f.name) for f in fields(batch)}, num_pairs=len(pairs))
