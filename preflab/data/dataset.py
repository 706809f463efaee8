"""Load a preference dataset: read rows, validate them, tokenize them, and report what was dropped."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from .formats import RowError, normalize_row
from .sources import FILE_SUFFIXES, read_rows
from .tokenize import PairTokenizer, TokenizedPair

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A user-caused data problem; the message names the file, row and field."""


@dataclass
class LoadReport:
    source: str
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # by kind: malformed, undecodable, identical
    examples: list[str] = field(default_factory=list)  # the first few problems, verbatim
    tokenizer_counts: dict = field(default_factory=dict)

    def note(self, kind: str, message: str) -> None:
        self.skipped[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(message)

    def summary(self) -> str:
        parts = [f"{self.source}: {self.kept} pairs from {self.rows} rows"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{n} {kind}" for kind, n in sorted(self.skipped.items())))
        changed = {k: v for k, v in self.tokenizer_counts.items() if v}
        if changed:
            parts.append(", ".join(f"{v} {k.replace('_', ' ')}" for k, v in changed.items()))
        return "; ".join(parts)


def load_pairs(source: str, split: str, pair_tokenizer: PairTokenizer, on_error: str = "strict",
               limit: int | None = None) -> tuple[list[TokenizedPair], LoadReport]:
    """Validated, tokenized pairs of a source.

    ``on_error='strict'`` raises :class:`DataError` at the first malformed or undecodable row;
    ``'skip'`` drops it and counts it in the report. Rows whose chosen equals rejected are dropped and
    reported in both modes. ``limit`` keeps the first N good pairs.
    """
    report = LoadReport(source=source if source.endswith(FILE_SUFFIXES) else f"{source}[{split}]")
    pairs: list[TokenizedPair] = []
    before = dict(pair_tokenizer.counts)
    for row in read_rows(source, split):
        if limit is not None and len(pairs) >= limit:
            break
        report.rows += 1
        try:
            if row.data is None:
                raise RowError(row.where, "<row>", row.error or "unreadable", kind="undecodable")
            pairs.append(pair_tokenizer(normalize_row(row.data, row.where)))
        except RowError as e:
            if e.kind == "identical":
                report.note("identical", str(e))
                continue
            if on_error == "strict":
                raise DataError(f"{e} (set data.on_error=skip to skip such rows)") from None
            report.note(e.kind, str(e))
    report.kept = len(pairs)
    report.tokenizer_counts = {k: v - before.get(k, 0) for k, v in pair_tokenizer.counts.items()}
    if report.skipped:
        log.warning("%s; first: %s", report.summary(), report.examples[0])
    elif report.tokenizer_counts.get("boundary_mismatch"):
        log.warning("%s: the prompt tokenized alone is not a prefix of prompt + response; the response was taken "
                    "from the joint tokenization", report.summary())
    if not pairs:
        raise DataError(f"{report.source}: no usable pairs ({report.summary()})")
    return pairs, report
