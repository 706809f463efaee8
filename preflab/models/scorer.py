"""The hot path: per-sequence log-probabilities of response tokens.

A batch is laid out as token rows plus, for every position ``i``, the token that position predicts
(``target_ids[i]``, i.e. token ``i+1``) and the output sequence it counts for (``target_seq[i]``, −1 for
prompt, padding and the last position). The result is, per output sequence ``s``,
``logp[s] = Σ_{i: target_seq[i]=s} log π(target_ids[i] | tokens ≤ i)`` and the token count. Any layout
(padded, prefix-shared or packed rows: :mod:`preflab.data.collate`) only changes how rows, the mask, the
position ids and ``target_seq`` are built, never this code.

Custom layouts (prefix sharing, packing) pass a 4D boolean mask and position ids; SDPA takes the boolean mask
as it is, eager attention an additive one (built here), other attention kernels are refused.

The vocabulary projection runs only on response positions and chunk by chunk: a chunk's fp32 logits live
only while its log-softmax is taken, and under autograd each chunk is recomputed in the backward pass
(activation checkpointing), so the ``tokens × vocab`` fp32 logits never exist for the whole batch.

A pair batch also marks the positions within each pair's shared length (``target_shared``); the scorer then returns,
beside the totals, the log-prob of that part of each response (``Scores.shared``, LD-DPO's input).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """The decoder stack (hidden states after the final norm), the LM head and its logit soft-cap."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the LM
    head = base.get_output_embeddings()
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    if head is None or decoder is None:
        raise TypeError(f"{type(base).__name__}: cannot find the decoder and LM head; use scorer.chunk_size=0")
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return decoder, head, softcap


def _chunk_token_logps(hidden: Tensor, targets: Tensor, head: nn.Module, softcap: float | None) -> Tensor:
    logits = head(hidden).float()  # (n, V), fp32 for a stable log-softmax
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    # log_softmax, not gather − logsumexp: the fused kernel keeps fp32 sums of ~50 token log-probs within
    # 1e-5 of the full-logits path, the subtraction of two large numbers does not (5e-4 on SmolLM2)
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _model_mask(mask: Tensor, model: nn.Module) -> Tensor:
    """The attention mask in the form the model's attention kernel takes."""
    if mask.dim() != 4:
        return mask
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    impl = getattr(config, "_attn_implementation", None) or "eager"
    if impl == "sdpa":
        return mask
    if impl == "eager":
        dtype = next(model.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(f"attention {impl!r} cannot take the 4D mask of the shared/packed layouts; use "
                     "model.attn_implementation=sdpa (or eager), or scorer.layout=padded")


class Scores(NamedTuple):
    """Per output sequence, each ``(S,)`` float32: the summed log-probs of its scored tokens, their count, and
    (where the batch marks ``target_shared``) the summed log-probs of those within the pair's shared length."""

    logps: Tensor
    counts: Tensor
    shared: Tensor | None = None


class SequenceScorer(nn.Module):
    """Wraps a causal LM (plain or PEFT); ``forward`` returns :class:`Scores`.

    Args:
        model: a Hugging Face causal LM, possibly wrapped by PEFT.
        chunk_size: response tokens per slice of the vocabulary projection; 0 computes the full logits
            with the model's own forward (the plain path, kept as the reference implementation).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 256):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The model's decoder layer classes: the units FSDP's transformer auto-wrap shards one by one."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return getattr(base, "_no_split_modules", None)

    def forward(
        self,
        input_ids: Tensor,  # (R, T)
        attention_mask: Tensor,  # (R, T) 1 = token; or a 4D additive/boolean mask for custom layouts
        target_ids: Tensor,  # (R, T) token predicted at each position
        target_seq: Tensor,  # (R, T) output sequence index, -1 = not scored
        num_sequences: int,
        position_ids: Tensor | None = None,  # (R, T)
        target_shared: Tensor | None = None,  # (R, T) bool: within the pair's shared length
    ) -> Scores:
        attention_mask = _model_mask(attention_mask, self.model)
        scored = target_seq >= 0
        seq = target_seq[scored]  # (N,)
        targets = target_ids[scored]
        if self.chunk_size == 0:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False).logits
            token_logps = torch.log_softmax(logits.float(), dim=-1)[scored].gather(-1, targets[:, None]).squeeze(-1)
        else:
            decoder, head, softcap = _backbone_and_head(self.model)
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
            hidden = hidden[scored]  # (N, d): only response positions reach the vocabulary projection
            pieces = []
            for start in range(0, hidden.shape[0], self.chunk_size):
                h, t = hidden[start:start + self.chunk_size], targets[start:start + self.chunk_size]
                if torch.is_grad_enabled() and h.requires_grad:
                    pieces.append(checkpoint(_chunk_token_logps, h, t, head, softcap, use_reentrant=False))
                else:
                    pieces.append(_chunk_token_logps(h, t, head, softcap))
            token_logps = torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)
        logps = token_logps.new_zeros(num_sequences).index_add(0, seq, token_logps)
        counts = torch.zeros(num_sequences, dtype=torch.float32, device=seq.device).index_add(
            0, seq, torch.ones_like(seq, dtype=torch.float32))
        shared = None
        if target_shared is not None:
            within = target_shared[scored]
            shared = token_logps.new_zeros(num_sequences).index_add(0, seq[within], token_logps[within])
        return Scores(logps, counts, shared)


@contextmanager
def eval_mode(module: nn.Module):
    """Dropout off for a forward that must be deterministic (reference, evaluation); restores the mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
