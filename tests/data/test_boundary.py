"""The prompt/response boundary: whatever the strings and wherever the cut, the scored token sequence decodes to
exactly the rendered prompt followed by the rendered response (no character lost or scored twice), in plain,
conversational and implicit-prompt rows, and in every layout of the scorer."""

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from preflab.data.collate import LAYOUTS, collate_pairs
from preflab.data.formats import RowError, normalize_row
from preflab.data.tokenize import PairTokenizer

# letters, digits, punctuation, spaces and newlines, accents and a few multi-byte characters: the characters a
# byte-level BPE merges across a boundary
ALPHABET = st.sampled_from(list("abcdeHlo wrld  \n\t.,!?'-0123456789éüß€✓中文") + ["😀", "  ", "\n\n"])
TEXT = st.lists(ALPHABET, min_size=1, max_size=24).map("".join)
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


def _scored_sequences(batch, pairs: int) -> list[list[int]]:
    """For each output sequence of a batch: the tokens its first scored position sees (in position order) followed
    by every scored target, i.e. the token sequence the scorer scores, rebuilt from the batch alone."""
    out = []
    for seq in range(2 * pairs):
        rows, cols = (batch.target_seq == seq).nonzero(as_tuple=True)
        row, first = int(rows[0]), int(cols.min())
        mask = batch.attention_mask[row]
        if mask.dim() == 1:  # padded: a 2D mask, causal along the row
            visible = [u for u in range(first + 1) if mask[u]]
        else:  # shared / packed: the 4D block mask of the row
            visible = mask[0, first, : first + 1].nonzero().flatten().tolist()
        positions = batch.position_ids[row] if batch.position_ids is not None else torch.arange(mask.shape[-1])
        visible.sort(key=lambda u: int(positions[u]))
        context = batch.input_ids[row, visible].tolist()
        targets = batch.target_ids[row, cols[rows == row]].tolist()
        out.append(context + targets)
    return out


def _check(tokenizer, row: dict) -> None:
    pt = PairTokenizer(tokenizer, max_length=4096, max_prompt_length=None)
    try:
        example = normalize_row(row, "row")
    except RowError:
        assume(False)  # an invalid row (empty or identical responses) is not what this test is about
    prompt, chosen, rejected, _ = pt.render(example)
    pair = pt(example)
    assert _decode(tokenizer, pair.prompt_ids) == prompt
    for ids, text in ((pair.chosen_ids, chosen), (pair.rejected_ids, rejected)):
        assert _decode(tokenizer, pair.prompt_ids + ids) == prompt + text
    for layout in LAYOUTS:
        batch = collate_pairs([pair, pair], tokenizer.pad_token_id, layout, pack_tokens=10_000)
        for seq, text in zip(_scored_sequences(batch, 2), (chosen, chosen, rejected, rejected)):
            assert _decode(tokenizer, seq) == prompt + text, layout


@SETTINGS
@given(text=TEXT, cut=st.integers(0, 24), other=TEXT)
def test_plain_rows_at_any_cut(tokenizer, text, cut, other):
    cut = min(max(cut, 1), len(text))
    _check(tokenizer, {"prompt": text[:cut], "chosen": text[cut:] or other, "rejected": other + "x"})


@SETTINGS
@given(prompt=TEXT, chosen=TEXT, rejected=TEXT)
def test_conversational_rows(tokenizer, prompt, chosen, rejected):
    message = lambda role, text: [{"role": role, "content": text}]
    _check(tokenizer, {"prompt": message("user", prompt), "chosen": message("assistant", chosen),
                       "rejected": message("assistant", rejected)})


@SETTINGS
@given(shared=TEXT, chosen=TEXT, rejected=TEXT)
def test_implicit_prompt_rows(tokenizer, shared, chosen, rejected):
    _check(tokenizer, {"chosen": shared + " " + chosen, "rejected": shared + " " + rejected})


@pytest.mark.parametrize("prompt,chosen", [("The answer is ", "yes."), ("Hel", "lo world"), ("a", "\n\nb"),
                                           ("caf", "é au lait"), ("x ", " y")])
def test_the_cases_that_merged_across_the_boundary(tokenizer, prompt, chosen):
    """(before the fix, "The answer is " + "yes." was scored as "The answer is  yes.", "Hel" + "lo world" as
    "HelHello world")"""
    pt = PairTokenizer(tokenizer)
    pair = pt(normalize_row({"prompt": prompt, "chosen": chosen, "rejected": "no"}, "w"))
    assert _decode(tokenizer, pair.prompt_ids + pair.chosen_ids) == prompt + chosen + tokenizer.eos_token
