"""Token sequences to batches for the scorer, in one of three layouts.

Position ``t`` of a row predicts token ``t+1`` (``target_ids``) and counts toward output sequence
``target_seq[t]`` when that token is a response token, else −1 (see :mod:`preflab.models.scorer`). A
:class:`PreferenceBatch` of ``B`` pairs scores sequence ``i`` = chosen of pair ``i`` and ``B + i`` = its
rejected, whatever the layout:

- ``padded``: one row per (prompt, response), right padding, a 2D mask. The prompt is computed twice.
- ``shared`` (prefix sharing): one row per pair, ``prompt[:-1]``, then ``prompt[-1] + chosen``, then
  ``prompt[-1] + rejected``, with a 4D mask under which each branch sees the shared prefix and itself, not
  the other branch, and position ids that restart at the branch for both. The last prompt token heads both
  branches (it is the position that predicts a response's first token, so each branch needs its own; it sees
  exactly the context it sees in the padded layout). Cost: one token per pair instead of a whole prompt.
- ``packed``: the shared layout with several pairs per row, up to ``pack_tokens`` tokens a row (first fit,
  longest pair first), each pair masked off from the others: padding only at the ends of rows.

Attention inside a row under the 4D mask equals attention of the separate sequences (the masked keys get
probability zero), so the three layouts give the same log-probs up to float rounding.

A pair batch also marks, in every layout, the scored positions of each response's first ``min(|y⁺|, |y⁻|)`` tokens
(``target_shared``): the part of the response as long as the pair's shorter one, which LD-DPO weights apart from the
excess (:meth:`preflab.losses.PairLogps.length_desensitized`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from .tokenize import TokenizedPair

LAYOUTS = ("padded", "shared", "packed")


@dataclass
class SequenceBatch:
    input_ids: Tensor  # (R, T)
    attention_mask: Tensor  # (R, T) 1 = token, or (R, 1, T, T) bool: query t may attend key u
    target_ids: Tensor  # (R, T)
    target_seq: Tensor  # (R, T), -1 = not scored
    num_tokens: int  # prompt + response tokens, the prompt counted once per response (TRL's count for pairs)
    position_ids: Tensor | None = None  # (R, T); None: 0, 1, 2... along each row
    num_seqs: int = -1  # output sequences; -1: one per row
    target_shared: Tensor | None = None  # (R, T) bool: within the pair's shared length (pair batches only)

    @property
    def num_sequences(self) -> int:
        return self.input_ids.shape[0] if self.num_seqs < 0 else self.num_seqs

    def scorer_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "target_ids": self.target_ids,
                "target_seq": self.target_seq, "num_sequences": self.num_sequences,
                "position_ids": self.position_ids, "target_shared": self.target_shared}

    def to(self, device):
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})


@dataclass
class PreferenceBatch(SequenceBatch):
    num_pairs: int = 0  # sequences [0, B) are chosen, [B, 2B) rejected


def collate_sequences(rows: list[tuple[tuple[int, ...], tuple[int, ...]]], pad_id: int) -> SequenceBatch:
    """``rows`` of ``(prompt_ids, response_ids)``, padded layout; only response tokens are scored."""
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


def _shared_pieces(pair: TokenizedPair, chosen_seq: int, rejected_seq: int) -> dict[str, list[int]]:
    """One pair in the shared layout: tokens, positions, branch (0 prefix, 1 chosen, 2 rejected), targets, seq."""
    prefix, head = list(pair.prompt_ids[:-1]), list(pair.prompt_ids[-1:])
    out = {"ids": list(prefix), "pos": list(range(len(prefix))), "branch": [0] * len(prefix),
           "targets": [0] * len(prefix), "seq": [-1] * len(prefix)}
    for branch, response, seq in ((1, pair.chosen_ids, chosen_seq), (2, pair.rejected_ids, rejected_seq)):
        tokens = head + list(response)
        out["ids"] += tokens
        out["pos"] += range(len(prefix), len(prefix) + len(tokens))
        out["branch"] += [branch] * len(tokens)
        # each branch position predicts the next token of its branch: all response tokens (with no prompt,
        # the first is unscorable, as in the padded layout)
        out["targets"] += tokens[1:] + [0]
        out["seq"] += [seq] * (len(tokens) - 1) + [-1]
    return out


def _pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped into rows of at most ``budget`` tokens (a longer item gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


def block_mask(doc: Tensor, branch: Tensor) -> Tensor:
    """(R, 1, T, T) bool: query t attends key u ≤ t of the same pair (``doc`` ≥ 0) on the shared prefix
    (branch 0) or on its own branch; padding (``doc`` −1) attends only itself."""
    width = doc.shape[1]
    idx = torch.arange(width)
    causal = idx[None, :] <= idx[:, None]  # [t, u]
    same_doc = (doc[:, :, None] == doc[:, None, :]) & (doc[:, None, :] >= 0)
    visible = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    return ((causal & same_doc & visible) | torch.eye(width, dtype=torch.bool))[:, None]


def _collate_shared(pairs: list[TokenizedPair], pad_id: int, pack_tokens: int | None) -> PreferenceBatch:
    b = len(pairs)
    pieces = [_shared_pieces(p, i, b + i) for i, p in enumerate(pairs)]
    lengths = [len(p["ids"]) for p in pieces]
    groups = [[i] for i in range(b)] if pack_tokens is None else _pack(lengths, pack_tokens)
    width = max(sum(lengths[i] for i in g) for g in groups)
    shape = (len(groups), width)
    cols = {"ids": torch.full(shape, pad_id, dtype=torch.long), "pos": torch.zeros(shape, dtype=torch.long),
            "branch": torch.zeros(shape, dtype=torch.long), "targets": torch.zeros(shape, dtype=torch.long),
            "seq": torch.full(shape, -1, dtype=torch.long)}
    doc = torch.full(shape, -1, dtype=torch.long)
    for row, group in enumerate(groups):
        start = 0
        for i in group:
            end = start + lengths[i]
            for key, tensor in cols.items():
                tensor[row, start:end] = torch.tensor(pieces[i][key], dtype=torch.long)
            doc[row, start:end] = i
            start = end
    return PreferenceBatch(cols["ids"], block_mask(doc, cols["branch"]), cols["targets"], cols["seq"],
                           sum(p.num_tokens for p in pairs), position_ids=cols["pos"], num_seqs=2 * b, num_pairs=b)


def shared_targets(target_seq: Tensor, num_pairs: int) -> Tensor:
    """(R, T) bool: the scored positions among the first ``min(n⁺, n⁻)`` scored positions of their sequence, where
    sequence ``i < num_pairs`` (chosen) and ``num_pairs + i`` (rejected) have ``n⁺`` and ``n⁻``; positions are
    counted in row-major order, whatever the layout."""
    flat = target_seq.flatten()
    where = (flat >= 0).nonzero().squeeze(1)
    seq = flat[where]
    counts = torch.bincount(seq, minlength=2 * num_pairs)
    shared = torch.minimum(counts[:num_pairs], counts[num_pairs:]).repeat(2)
    order = torch.argsort(seq, stable=True)  # each sequence's positions together, in row-major order
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(seq)
    rank[order] = torch.arange(len(seq)) - starts[seq[order]]
    out = torch.zeros(flat.shape, dtype=torch.bool)
    out[where] = rank < shared[seq]
    return out.view_as(target_seq)


def collate_pairs(pairs: list[TokenizedPair], pad_id: int, layout: str = "padded",
                  pack_tokens: int = 4096) -> PreferenceBatch:
    """A batch of ``pairs`` in ``layout`` (see the module docstring); ``pack_tokens`` bounds a packed row."""
    if layout == "padded":
        rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
        sequences = collate_sequences(rows, pad_id)
        batch = PreferenceBatch(**{f.name: getattr(sequences, f.name) for f in fields(sequences)},
                                num_pairs=len(pairs))
    elif layout in ("shared", "packed"):
        batch = _collate_shared(pairs, pad_id, pack_tokens if layout == "packed" else None)
    else:
        raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    batch.target_shared = shared_targets(batch.target_seq, len(pairs))
    return batch
