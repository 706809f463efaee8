"""Read raw rows from wherever a dataset lives, each with the place it came from.

A source string is one of:

- ``builtin:NAME``: a dataset shipped in ``preflab/datasets/NAME/<split>.jsonl``;
- a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file;
- a local Hugging Face dataset directory (``save_to_disk`` output, or a folder of data files);
- anything else: a hub dataset name for ``datasets.load_dataset`` (needs the network).

Rows come out as ``RawRow(where, data)`` where ``data`` is a dict, or ``None`` with ``error`` set when the
row could not be decoded (the caller decides whether that stops the run or is skipped and counted).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BUILTIN_ROOT = Path(__file__).resolve().parent.parent / "datasets"
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataSourceError(ValueError):
    """The source as a whole cannot be read (missing file, unknown format, bad split)."""


@dataclass(frozen=True)
class RawRow:
    where: str  # "file.jsonl row 12"
    data: dict | None
    error: str | None = None


def builtin_path(name: str, split: str) -> Path:
    path = BUILTIN_ROOT / name / f"{split}.jsonl"
    if not path.is_file():
        known = sorted(p.name for p in BUILTIN_ROOT.iterdir() if p.is_dir()) if BUILTIN_ROOT.is_dir() else []
        splits = sorted(p.stem for p in (BUILTIN_ROOT / name).glob("*.jsonl") if "." not in p.stem) \
            if (BUILTIN_ROOT / name).is_dir() else []
        raise DataSourceError(f"builtin dataset {name!r} has no split {split!r} (datasets: {known}, splits: {splits})")
    return path


def read_rows(source: str, split: str = "train") -> Iterator[RawRow]:
    """Rows of a source; see the module docstring for the accepted forms."""
    if source.startswith("builtin:"):
        yield from _read_jsonl(builtin_path(source.split(":", 1)[1], split))
        return
    path = Path(source).expanduser()
    if path.suffix in FILE_SUFFIXES or path.is_file():
        if not path.is_file():
            raise DataSourceError(f"data file {path} does not exist")
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        reader = readers.get(path.suffix)
        if reader is None:
            raise DataSourceError(f"data file {path}: unknown format {path.suffix!r}; expected one of {FILE_SUFFIXES}")
        yield from reader(path)
    elif path.is_dir():
        yield from _read_hf_dir(path, split)
    elif source.startswith((".", "/", "~")):
        raise DataSourceError(f"data path {path} does not exist")
    else:
        yield from _read_hub(source, split)


def _read_jsonl(path: Path) -> Iterator[RawRow]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path} row {number}"
            if not raw.strip():
                continue
            try:
                data = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield RawRow(where, None, f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            except json.JSONDecodeError as e:
                yield RawRow(where, None, f"not valid JSON ({e.msg} at column {e.colno})")
                continue
            yield _as_row(where, data)


def _read_json(path: Path) -> Iterator[RawRow]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataSourceError(f"data file {path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataSourceError(f"data file {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataSourceError(f"data file {path}: expected a JSON list of rows (or {{\"data\": [...]}})")
    for number, item in enumerate(data, start=1):
        yield _as_row(f"{path} row {number}", item)


CSV_FIELD_LIMIT = 64 * 2**20  # characters per cell (the csv module's default, 128 KiB, is below long responses)


def _read_csv(path: Path) -> Iterator[RawRow]:
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            for number, record in enumerate(reader, start=1):
                where = f"{path} row {number}"
                extra = record.pop(None, None)  # cells past the header's (an unquoted comma shifts the columns)
                if extra is not None or None in record.values():
                    cells = len(reader.fieldnames) + len(extra or []) - list(record.values()).count(None)
                    yield RawRow(where, None, f"{cells} cells under a header of {len(reader.fieldnames)} (line "
                                              f"{reader.line_num}; a cell holding a comma must be quoted)")
                    continue
                yield RawRow(where, {k: _maybe_messages(v) for k, v in record.items()})
    except UnicodeDecodeError as e:
        raise DataSourceError(f"data file {path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataSourceError(f"data file {path}: not readable as CSV at line {reader.line_num} ({e})") from None


def _maybe_messages(cell: str | None):
    """CSV cells hold text; a cell that is a JSON list (chat messages) is decoded."""
    if isinstance(cell, str) and cell.lstrip().startswith("["):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError:
            return cell
        if isinstance(value, list) and all(isinstance(m, dict) for m in value):
            return value
    return cell


def _read_parquet(path: Path) -> Iterator[RawRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataSourceError(f"data file {path}: not a readable Parquet file ({e})") from None
    for number, item in enumerate(table.to_pylist(), start=1):
        yield _as_row(f"{path} row {number}", item)


def _read_hf_dir(path: Path, split: str) -> Iterator[RawRow]:
    import datasets

    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file():
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataSourceError(f"dataset {path}: no split {split!r}; splits: {sorted(ds)}")
        ds = ds[split]
    for number, item in enumerate(ds, start=1):
        yield _as_row(f"{path}[{split}] row {number}", item)


def _read_hub(name: str, split: str) -> Iterator[RawRow]:  # pragma: no cover - needs the network
    import datasets

    ds = datasets.load_dataset(name, split=split)
    for number, item in enumerate(ds, start=1):
        yield _as_row(f"{name}[{split}] row {number}", item)


def _as_row(where: str, data) -> RawRow:
    if not isinstance(data, dict):
        return RawRow(where, None, f"expected an object with prompt/chosen/rejected, got {type(data).__name__}")
    return RawRow(where, data)
