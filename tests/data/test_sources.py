"""Every source format gives the same pairs; bad rows are reported with file and row, strictly or skipped."""

import csv
import json

import pytest
from conftest import sentiment_rows, write_jsonl

from preflab.data.dataset import DataError, load_pairs
from preflab.data.sources import DataSourceError, read_rows
from preflab.data.tokenize import PairTokenizer

ROWS = [{"prompt": f"Question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(5)]


def _write_all_formats(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS)}
    (tmp_path / "d.json").write_text(json.dumps(ROWS))
    paths["json"] = str(tmp_path / "d.json")
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows(ROWS)
    paths["csv"] = str(tmp_path / "d.csv")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "d.parquet")
    paths["parquet"] = str(tmp_path / "d.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "hfdir"))
    paths["hf_dir"] = str(tmp_path / "hfdir")
    return paths


def test_all_formats_read_the_same_pairs(tmp_path, tokenizer):
    results = {}
    for kind, path in _write_all_formats(tmp_path).items():
        pairs, report = load_pairs(path, "train", PairTokenizer(tokenizer))
        assert report.kept == 5, kind
        results[kind] = [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]
    first = results.pop("jsonl")
    for kind, got in results.items():
        assert got == first, kind


def test_csv_cells_holding_chat_messages_are_decoded(tmp_path, tokenizer):
    rows = sentiment_rows(2)
    with open(tmp_path / "c.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerows({k: json.dumps(v) for k, v in r.items()} for r in rows)
    pairs, _ = load_pairs(str(tmp_path / "c.csv"), "train", PairTokenizer(tokenizer))
    ref, _ = load_pairs(write_jsonl(tmp_path / "c.jsonl", rows), "train", PairTokenizer(tokenizer))
    assert pairs == ref


def test_a_csv_row_with_more_or_fewer_cells_than_the_header_is_a_row_error(tmp_path, tokenizer):
    # an unquoted comma in a field shifts the columns: the row must not be trained on, even read loosely
    path = tmp_path / "shifted.csv"
    path.write_text("prompt,chosen,rejected\nReview 1,Good,Bad\nReview 2,Lovely, really good,Awful\n"
                    "Review 3,Fine\nReview 4,Nice,Poor\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"shifted.csv row 2: .*4 cells under a header of 3 \(line 3"):
        load_pairs(str(path), "train", PairTokenizer(tokenizer))
    pairs, report = load_pairs(str(path), "train", PairTokenizer(tokenizer), on_error="skip")
    assert report.rows == 4 and report.kept == len(pairs) == 2
    assert "row 3: field '<row>': 2 cells under a header of 3" in " ".join(report.examples)


def _dirty_file(tmp_path):
    path = tmp_path / "dirty.jsonl"
    lines = [json.dumps(ROWS[0]).encode(), b"{not json", json.dumps({"prompt": "Q", "chosen": "a"}).encode(),
             b"\xff\xfe bad bytes", json.dumps(ROWS[1]).encode(), json.dumps({"prompt": "Q", "chosen": "x",
                                                                              "rejected": "x"}).encode(),
             b"[1, 2]", json.dumps(ROWS[2]).encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_strict_stops_at_the_first_bad_row_naming_file_row_and_field(tmp_path, tokenizer):
    path = _dirty_file(tmp_path)
    with pytest.raises(DataError) as info:
        load_pairs(path, "train", PairTokenizer(tokenizer), on_error="strict")
    assert f"{path} row 2" in str(info.value) and "not valid JSON" in str(info.value)


def test_skip_counts_every_kind_and_keeps_the_good_rows(tmp_path, tokenizer):
    pairs, report = load_pairs(_dirty_file(tmp_path), "train", PairTokenizer(tokenizer), on_error="skip")
    assert len(pairs) == 3
    assert report.skipped == {"undecodable": 3, "malformed": 1, "identical": 1}
    assert "row 3" in " ".join(report.examples) and "'rejected': missing" in " ".join(report.examples)
    assert "skipped" in report.summary()


def test_identical_pairs_are_reported_even_in_strict_mode(tmp_path, tokenizer):
    rows = ROWS[:2] + [{"prompt": "Q", "chosen": "same", "rejected": "same"}]
    pairs, report = load_pairs(write_jsonl(tmp_path / "i.jsonl", rows), "train", PairTokenizer(tokenizer))
    assert len(pairs) == 2 and report.skipped["identical"] == 1


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        list(read_rows(str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataSourceError, match="builtin dataset 'nope'"):
        list(read_rows("builtin:nope"))


def test_builtin_sentiment_dataset_is_shipped(tokenizer):
    rows = list(read_rows("builtin:sentiment", "eval"))
    assert len(rows) >= 100 and all(r.data is not None for r in rows)
    assert {"prompt", "chosen", "rejected", "score_chosen", "score_rejected", "domain"} <= set(rows[0].data)
    assert all(r.data["score_chosen"] > r.data["score_rejected"] for r in rows)
