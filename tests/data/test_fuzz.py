"""Property-based: whatever a user feeds the loaders ends in a clear error naming the place, or a counted skip.

Malformed rows (wrong types, missing fields, wrong chat-message shapes, huge and empty fields, odd Unicode),
files of arbitrary bytes (wrong encodings, torn JSON lines) in every file format, and broken config files and
overrides: the only exceptions allowed are preflab's user-facing ones, and their messages name the file, row
or key.
"""

import csv
import io
import json
import os
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from preflab.config import Config, ConfigError, load_config, resolve
from preflab.data.dataset import DataError, load_pairs
from preflab.data.formats import RowError, normalize_row
from preflab.data.sources import DataSourceError
from preflab.data.tokenize import PairTokenizer

# PREFLAB_FUZZ_EXAMPLES=2000 searches harder than CI does
FUZZ = settings(max_examples=int(os.environ.get("PREFLAB_FUZZ_EXAMPLES", 60)), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

_text = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "\n", "\x00", "<|im_end|>", "<|im_start|>assistant", "\ud7ff", "\u200b" * 3]),
    st.builds(lambda n, c: c * n, st.integers(2_000, 40_000), st.sampled_from(["a", "é ", "🙂", "word "])),
)
_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), _text)
_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "", "USER"]),
                           "content": st.one_of(_text, _scalar, st.lists(_scalar, max_size=2))}),
    st.dictionaries(st.sampled_from(["role", "content", "name", "x"]), _scalar, max_size=3),
    _scalar,
)
_field = st.one_of(_text, st.lists(_message, max_size=4), _scalar, st.dictionaries(_text, _scalar, max_size=2))
_row = st.one_of(
    st.fixed_dictionaries({}, optional={"prompt": _field, "chosen": _field, "rejected": _field, "score": _scalar}),
    st.dictionaries(st.text(max_size=8), _field, max_size=4),
)


@pytest.fixture(scope="module")
def pair_tokenizer(tokenizer):
    return PairTokenizer(tokenizer, max_length=64, max_prompt_length=32)


@FUZZ
@given(row=_row)
def test_any_row_is_a_pair_or_a_row_error_naming_row_and_field(pair_tokenizer, row):
    where = "data.jsonl row 7"
    try:
        pair = pair_tokenizer(normalize_row(row, where))
    except RowError as e:
        assert str(e).startswith(f"{where}: field ") and e.kind in ("malformed", "identical")
    else:
        assert pair.chosen_ids and pair.rejected_ids and len(pair.prompt_ids) <= 32


_good_line = _row.map(lambda r: json.dumps(r).encode())
_line = st.one_of(_good_line, _good_line.map(lambda b: b[: len(b) // 2]), st.binary(max_size=40),
                  st.just(b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}'),  # latin-1, not UTF-8
                  st.just(b'{"prompt": "p", "chosen": "yes", "rejected": "no"}'))


def _check_load(path: Path, pair_tokenizer) -> None:
    for mode in ("strict", "skip"):
        try:
            pairs, report = load_pairs(str(path), "train", pair_tokenizer, on_error=mode)
        except (DataError, DataSourceError) as e:
            assert str(path) in str(e), str(e)
        else:
            assert report.kept == len(pairs) > 0
            assert report.rows == report.kept + sum(report.skipped.values())  # every row kept or counted


@FUZZ
@given(lines=st.lists(_line, max_size=6))
def test_any_jsonl_bytes_load_or_fail_naming_the_file(pair_tokenizer, lines):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "data.jsonl"
        path.write_bytes(b"\n".join(lines))
        _check_load(path, pair_tokenizer)


@FUZZ
@given(rows=st.lists(_row, max_size=4), junk=st.binary(max_size=30), cut=st.booleans())
@example(rows=[{"prompt": "word " * 30_000, "chosen": "a", "rejected": "b"}], junk=b"", cut=False)  # was csv.Error
def test_any_json_and_csv_file_loads_or_fails_naming_the_file(pair_tokenizer, rows, junk, cut):
    with tempfile.TemporaryDirectory() as d:
        text = json.dumps(rows).encode()
        (Path(d) / "data.json").write_bytes(text[: len(text) // 2] + junk if cut else text)
        _check_load(Path(d) / "data.json", pair_tokenizer)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["prompt", "chosen", "rejected"], extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()})
        data = buffer.getvalue().encode("utf-8", "surrogatepass")
        (Path(d) / "data.csv").write_bytes(data + junk if cut else data)
        _check_load(Path(d) / "data.csv", pair_tokenizer)


# -- configs ----------------------------------------------------------------------------------------------------

_KEYS = ["output_dir", "seed", "schedule", "model", "name", "dtype", "parametrization", "kind", "r", "loss", "beta",
         "train", "lr", "max_steps", "batch_size", "adam_betas", "data", "on_error", "eval", "task", "apo", "alpha",
         "optim", "reserve_p", "diag", "probe_every", "0", "bogus"]
_yaml_value = st.recursive(_scalar | st.sampled_from(["1e-4", "lora", "sigmoid", "[1, 2]", "null"]),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), inner,
                                                                                       max_size=4), max_leaves=12)


def _config_outcome(fn) -> None:
    try:
        assert isinstance(fn(), Config)
    except ConfigError as e:
        assert str(e)


@FUZZ
@given(tree=st.dictionaries(st.sampled_from(_KEYS), _yaml_value, max_size=5))
@example(tree={"parametrization": {"kind": []}})  # found by this test: was a TypeError (unhashable list)
def test_any_config_tree_resolves_or_names_the_key(tree):
    _config_outcome(lambda: resolve(tree))


@FUZZ
@given(overrides=st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.lists(st.sampled_from(_KEYS), min_size=1, max_size=3).map(".".join),
              st.text(string.printable, max_size=12)),
    st.text(max_size=20)), max_size=4))
def test_any_overrides_apply_or_name_the_key(overrides):
    _config_outcome(lambda: load_config(None, overrides))


@FUZZ
@given(content=st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode),
                         st.dictionaries(st.sampled_from(_KEYS), _yaml_value, max_size=4).map(
                             lambda t: json.dumps(t).encode())))
def test_any_config_file_loads_or_fails_naming_the_file(content):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "run.yaml"
        path.write_bytes(content)
        try:
            load_config(path)
        except ConfigError as e:
            assert str(e)
