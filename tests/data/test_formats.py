"""Row formats TRL accepts, and the errors a malformed row gives (row and field named)."""

import pytest

from preflab.data.formats import RowError, normalize_row

MSG = lambda role, text: [{"role": role, "content": text}]


def test_standard_row():
    ex = normalize_row({"prompt": "Q?", "chosen": "yes", "rejected": "no", "domain": "d"}, "f row 1")
    assert (ex.prompt, ex.chosen, ex.rejected, ex.conversational) == ("Q?", "yes", "no", False)
    assert ex.extra == {"domain": "d"}


def test_conversational_row_and_string_parts_are_wrapped():
    ex = normalize_row({"prompt": MSG("user", "Q?"), "chosen": "yes", "rejected": MSG("assistant", "no")}, "w")
    assert ex.conversational
    assert ex.chosen == MSG("assistant", "yes") and ex.prompt == MSG("user", "Q?")


def test_implicit_prompt_conversations():
    system = MSG("system", "be nice")
    chosen = system + MSG("user", "Q?") + MSG("assistant", "yes")
    rejected = system + MSG("user", "Q?") + MSG("assistant", "no")
    ex = normalize_row({"chosen": chosen, "rejected": rejected}, "w")
    assert ex.prompt == system + MSG("user", "Q?")
    assert ex.chosen == MSG("assistant", "yes") and ex.rejected == MSG("assistant", "no")


def test_implicit_prompt_strings_split_at_a_word_boundary():
    ex = normalize_row({"chosen": "The answer is four.", "rejected": "The answer is five."}, "w")
    assert (ex.prompt, ex.chosen, ex.rejected) == ("The answer is", " four.", " five.")
    ex = normalize_row({"chosen": "Q: two?\n\nYes.", "rejected": "Q: two?\n\nNo."}, "w")
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Q: two?", "\n\nYes.", "\n\nNo.")


@pytest.mark.parametrize("row,field,text", [
    ({"prompt": "Q", "rejected": "no"}, "chosen", "missing"),
    ({"prompt": "Q", "chosen": "yes"}, "rejected", "missing"),
    ({"prompt": "Q", "chosen": 3, "rejected": "no"}, "chosen", "expected a string or a list"),
    ({"prompt": "Q", "chosen": "  ", "rejected": "no"}, "chosen", "empty response"),
    ({"prompt": "Q", "chosen": "yes", "rejected": []}, "rejected", "empty response"),
    ({"prompt": MSG("user", "Q"), "chosen": [{"role": "bot", "content": "x"}], "rejected": "no"}, "chosen[0].role",
     "expected one of"),
    ({"prompt": MSG("user", "Q"), "chosen": [{"role": "assistant", "content": None}], "rejected": "n"},
     "chosen[0].content", "expected a string"),
    ({"prompt": MSG("user", "Q"), "chosen": ["hi"], "rejected": "n"}, "chosen[0]", "role, content"),
    ({"chosen": MSG("assistant", "a"), "rejected": MSG("assistant", "b")}, "prompt", "share no leading"),
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, "rejected", "identical"),
])
def test_malformed_rows_name_row_and_field(row, field, text):
    with pytest.raises(RowError) as info:
        normalize_row(row, "data.jsonl row 7")
    assert info.value.field == field
    assert "data.jsonl row 7" in str(info.value) and text in str(info.value)
