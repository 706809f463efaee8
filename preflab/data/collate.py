"""Tokenized pairs to a :class:`PreferenceBatch`: one padded row per sequence, chosen rows first.

Row ``i`` holds pair ``i``'s prompt + chosen response; row ``B + i`` its prompt + rejected response. Right
padding. Position ``t`` predicts token ``t+1`` (``target_ids``) and counts toward output sequence
``target_seq[t]`` (its row) when token ``t+1`` is a response token, else −1. See
:mod:`preflab.models.scorer`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .tokenize import TokenizedPair


@dataclass
class PreferenceBatch:
    input_ids: Tensor  # (2B, T)
    attention_mask: Tensor  # (2B, T)
    target_ids: Tensor  # (2B, T)
    target_seq: Tensor  # (2B, T), -1 = not scored
    num_pairs: int
    num_tokens: int  # prompt + chosen + prompt + rejected, summed over pairs (TRL's count)

    def scorer_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "target_ids": self.target_ids,
                "target_seq": self.target_seq, "num_sequences": 2 * self.num_pairs}

    def to(self, device) -> "PreferenceBatch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device)
        return PreferenceBatch(**moved)


def collate_pairs(pairs: list[TokenizedPair], pad_id: int) -> PreferenceBatch:
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    target_ids = torch.zeros((n, width), dtype=torch.long)
    target_seq = torch.full((n, width), -1, dtype=torch.long)
    for row, (prompt, response) in enumerate(rows):
        ids = torch.tensor(prompt + response, dtype=torch.long)
        length, start = len(ids), len(prompt)
        input_ids[row, :length] = ids
        attention_mask[row, :length] = 1
        target_ids[row, : length - 1] = ids[1:]
        # positions start-1 .. length-2 predict the response tokens (with no prompt, the first is unscorable)
        target_seq[row, max(start, 1) - 1: length - 1] = row
    return PreferenceBatch(input_ids, attention_mask, target_ids, target_seq, len(pairs),
                           sum(p.num_tokens for p in pairs))
