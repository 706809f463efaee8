"""LD-DPO's input: in every layout the scorer returns, beside each response's log-prob, that of its first
``min(n⁺, n⁻)`` scored tokens (the pair's shared length), as TRL 1.16's ``ld_alpha`` computes it."""

import inspect
import textwrap

import pytest
import torch
from conftest import make_tiny_model
from test_layouts import LAYOUTS, _pairs
from torch.testing import assert_close

from preflab.data.collate import collate_pairs, shared_targets
from preflab.losses import PairLogps
from preflab.models.scorer import SequenceScorer


def _token_logps(model, pairs) -> list[torch.Tensor]:
    """Each scored token's log-prob, sequence by sequence (chosen of every pair, then rejected), from the model's
    full logits on each (prompt, response) alone: the scorer's definition, written out."""
    out = []
    for prompt, response in [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids)
                                                                              for p in pairs]:
        ids = torch.tensor([prompt + response])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        first = max(len(prompt), 1)  # with no prompt the first response token has no position predicting it
        out.append(torch.stack([logp[t - 1, ids[0, t]] for t in range(first, ids.shape[1])]))
    return out


def test_shared_targets_mark_the_first_tokens_up_to_the_shorter_response():
    """Two pairs, padded: pair 0 scores 3 chosen and 1 rejected token (shared length 1), pair 1 scores 2 and 2 (2).
    Rows (one per sequence; −1 unscored): [−1, 0, 0, 0], [−1, 1, 1, −1] | [−1, 2, −1, −1], [−1, 3, 3, −1]."""
    target_seq = torch.tensor([[-1, 0, 0, 0], [-1, 1, 1, -1], [-1, 2, -1, -1], [-1, 3, 3, -1]])
    assert shared_targets(target_seq, 2).int().tolist() == [[0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 0, 0], [0, 1, 1, 0]]
    # the positions of one sequence need not be in one row, nor its rows in order: counted in row-major order
    packed = torch.tensor([[1, 1, 0, -1, 0, 2, 3, 3, 3]])
    assert shared_targets(packed, 2).int().tolist() == [[1, 1, 1, 0, 0, 1, 1, 1, 0]]


@pytest.mark.parametrize("chunk_size", [0, 5])
@pytest.mark.parametrize("layout,budget", [("padded", 4096), *LAYOUTS])
def test_every_layout_scores_the_shared_length(tokenizer, layout, budget, chunk_size):
    model = make_tiny_model(tokenizer, seed=3)
    pairs = _pairs(tokenizer)
    b = len(pairs)
    batch = collate_pairs(pairs, tokenizer.pad_token_id, layout, budget)
    with torch.no_grad():
        scores = SequenceScorer(model, chunk_size=chunk_size)(**batch.scorer_inputs())
        tokens = _token_logps(model, pairs)
        without = SequenceScorer(model, chunk_size=chunk_size)(**{**batch.scorer_inputs(), "target_shared": None})
    shared_len = [min(len(tokens[i]), len(tokens[b + i])) for i in range(b)] * 2
    assert_close(scores.shared, torch.stack([t[:n].sum() for t, n in zip(tokens, shared_len)]), atol=1e-5, rtol=1e-6)
    assert_close(scores.logps, torch.stack([t.sum() for t in tokens]), atol=1e-5, rtol=1e-6)
    assert any(len(t) > n for t, n in zip(tokens, shared_len))  # the example has excess tokens to weight
    # the totals do not change by asking for the shared part (bit for bit), and without a mark there is none
    assert torch.equal(without.logps, scores.logps) and without.shared is None


@pytest.mark.parametrize("layout,budget", [("padded", 4096), *LAYOUTS])
def test_length_desensitized_logps_match_trl(tokenizer, layout, budget):
    """TRL 1.16's ``ld_alpha`` block of ``DPOTrainer._compute_loss`` (read with ``inspect``), run on the per-token
    log-probs and completion mask of the same pairs, against the scorer's output through
    :meth:`PairLogps.length_desensitized`."""
    trl = pytest.importorskip("trl")
    model = make_tiny_model(tokenizer, seed=3)
    pairs = _pairs(tokenizer)
    b, alpha = len(pairs), 0.3
    with torch.no_grad():
        tokens = _token_logps(model, pairs)
        scores = SequenceScorer(model)(**collate_pairs(pairs, tokenizer.pad_token_id, layout, budget).scorer_inputs())
    width = max(len(t) for t in tokens)
    per_token = torch.zeros(2 * b, width)  # TRL's shifted layout: completion tokens, zero-padded on the right
    mask = torch.zeros(2 * b, width, dtype=torch.long)
    for i, t in enumerate(tokens):
        per_token[i, :len(t)], mask[i, :len(t)] = t, 1
    source = inspect.getsource(trl.DPOTrainer._compute_loss)
    start = source.index("        if self.ld_alpha is None:")
    end = source.index("        chosen_logps, rejected_logps = logps.chunk(2, dim=0)")
    namespace = {"self": type("T", (), {"ld_alpha": alpha})(), "torch": torch, "device": "cpu",
                 "per_token_logps": per_token, "shift_completion_mask": mask}
    exec(compile(textwrap.dedent(source[start:end]), "trl DPOTrainer._compute_loss", "exec"), namespace)
    ours = PairLogps.of_batch(b, scores).length_desensitized(alpha)
    assert_close(torch.cat([ours.policy_chosen, ours.policy_rejected]), namespace["logps"], atol=1e-5, rtol=1e-6)
    plain = PairLogps.of_batch(b, scores)
    assert not torch.allclose(ours.policy_chosen, plain.policy_chosen) or \
        not torch.allclose(ours.policy_rejected, plain.policy_rejected)
