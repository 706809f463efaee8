"""Tokenization: prompt masking boundary, chat-template EOS, plain-text EOS, truncation."""

import pytest

from preflab.data.collate import collate_pairs
from preflab.data.formats import normalize_row
from preflab.data.tokenize import PairTokenizer

MSG = lambda role, text: [{"role": role, "content": text}]


def test_conversational_response_ends_with_the_templates_eos(tokenizer):
    ex = normalize_row({"prompt": MSG("user", "Hi"), "chosen": MSG("assistant", "Hello there"),
                        "rejected": MSG("assistant", "Go away")}, "w")
    pair = PairTokenizer(tokenizer)(ex)
    assert pair.chosen_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(pair.chosen_ids) == "Hello there<|im_end|>"
    rendered = tokenizer.apply_chat_template(MSG("user", "Hi"), tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(pair.prompt_ids) == rendered


def test_plain_text_gets_eos_appended_once(tokenizer):
    pt = PairTokenizer(tokenizer)
    pair = pt(normalize_row({"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5" + tokenizer.eos_token}, "w"))
    assert pair.chosen_ids[-1] == tokenizer.eos_token_id and pair.rejected_ids[-1] == tokenizer.eos_token_id
    assert list(pair.rejected_ids).count(tokenizer.eos_token_id) == 1
    assert tokenizer.decode(pair.prompt_ids) == "Q: 2+2?\nA:"


def test_boundary_mismatch_is_counted_and_response_comes_from_joint_tokens(tokenizer):
    pt = PairTokenizer(tokenizer)
    # "Hel" + "lo world": the prompt alone tokenizes differently from its part of the joint text
    pair = pt(normalize_row({"prompt": "Hel", "chosen": "lo world", "rejected": "p me"}, "w"))
    assert pt.counts["boundary_mismatch"] >= 1
    assert tokenizer.decode(pair.prompt_ids + pair.chosen_ids) .startswith("Hel")
    assert len(pair.chosen_ids) > 0


@pytest.mark.parametrize("side", ["left", "right"])
def test_prompt_truncation_side(tokenizer, side):
    prompt = " ".join(f"w{i}" for i in range(200))
    pt = PairTokenizer(tokenizer, max_length=64, max_prompt_length=16, prompt_truncation=side)
    full = tokenizer(prompt)["input_ids"]
    pair = pt(normalize_row({"prompt": prompt, "chosen": "yes", "rejected": "no"}, "w"))
    assert len(pair.prompt_ids) == 16
    assert list(pair.prompt_ids) == (full[-16:] if side == "left" else full[:16])
    assert pt.counts["truncated_prompt"] == 1


def test_max_length_truncates_responses_from_the_right(tokenizer):
    pt = PairTokenizer(tokenizer, max_length=20, max_prompt_length=8)
    long = " ".join(f"r{i}" for i in range(100))
    pair = pt(normalize_row({"prompt": "short prompt", "chosen": long, "rejected": "no"}, "w"))
    assert len(pair.prompt_ids) + len(pair.chosen_ids) == 20
    assert list(pair.chosen_ids) == tokenizer(long)["input_ids"][: len(pair.chosen_ids)]
    assert pt.counts["truncated_response"] == 1


def test_collate_marks_exactly_the_response_tokens(tokenizer):
    pt = PairTokenizer(tokenizer)
    pairs = [pt(normalize_row({"prompt": "Q one", "chosen": "a b c", "rejected": "d"}, "w")),
             pt(normalize_row({"prompt": "Question two is longer", "chosen": "e", "rejected": "f g h i"}, "w"))]
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    assert batch.input_ids.shape[0] == 4
    for row, (p, response) in enumerate([(pairs[0].prompt_ids, pairs[0].chosen_ids),
                                         (pairs[1].prompt_ids, pairs[1].chosen_ids),
                                         (pairs[0].prompt_ids, pairs[0].rejected_ids),
                                         (pairs[1].prompt_ids, pairs[1].rejected_ids)]):
        scored = (batch.target_seq[row] == row).nonzero().flatten().tolist()
        assert scored == list(range(len(p) - 1, len(p) + len(response) - 1))
        assert batch.target_ids[row, scored].tolist() == list(response)
        assert (batch.target_seq[row] >= 0).sum() == len(response)
    assert batch.num_tokens == sum(p.num_tokens for p in pairs)
