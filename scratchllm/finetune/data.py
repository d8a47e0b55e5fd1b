"""Labelled text for finetuning: reading tables (CSV, TSV, JSONL, JSON), labels and splits.

Formats are told by the file's suffix:
- `.csv`: comma-separated with standard CSV quoting (a field may hold commas, quotes, newlines);
- `.tsv`, `.tab`, `.txt`: tab-separated, one record per line, quote characters kept as text (the SMS
  Spam Collection has texts with unbalanced `"`: a CSV reader that honours quotes merges lines);
- `.jsonl` / `.ndjson`: one JSON object per line; `.json`: a JSON list of objects.
CSV and TSV files have a header row naming the columns, unless `header=False`: then columns are
named by their position, `0`, `1`, ...

Every record remembers where it came from (`file:line`), so errors point at the line to fix.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ScratchLLMError
from ..fileio import read_json_records

TSV_SUFFIXES = (".tsv", ".tab", ".txt")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TABLE_SUFFIXES = (".csv", *TSV_SUFFIXES, *JSONL_SUFFIXES, ".json")


@dataclass(frozen=True)
class Example:
    """One labelled text: the label is a class name (a string) until a `LabelSet` maps it to an id."""

    text: str
    label: str
    source: str = ""  # "file:line", for error messages


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScratchLLMError(f"data file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ScratchLLMError(f"{path}: byte {e.start} is not valid UTF-8; convert the file to UTF-8") from e
    except OSError as e:
        raise ScratchLLMError(f"cannot read {path}: {e.strerror or e}") from e


def read_table(
    path: str | os.PathLike, header: bool = True, wanted: Sequence[tuple[str, str]] = ()
) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """The column names and the records (`(source, {column: value})`) of a CSV/TSV/JSONL/JSON file.
    A name the header gives twice names its first column; the others read as NAME.1, NAME.2 (as in
    pandas). Each `(name, what)` of `wanted` (the columns a command reads) must be named once."""
    path = Path(path)
    suffix = path.suffix.lower()
    if path.is_dir():
        raise ScratchLLMError(f"data file {path} is a directory; give a .csv, .tsv, .jsonl or .json file")
    if suffix not in TABLE_SUFFIXES:
        raise ScratchLLMError(
            f"{path}: unknown data format {suffix or '(no suffix)'!r}; use .csv, .tsv, .jsonl or .json"
        )
    if suffix in JSONL_SUFFIXES or suffix == ".json":
        if not header:
            raise ScratchLLMError(
                f"{path}: --header false is for CSV/TSV files; JSON records name their fields (leave it out)"
            )
        found = read_json_records(path)
        # sources as for CSV rows (file:line), or file[index] in a JSON list
        records = [
            (f"{path}[{n - 1}]" if "record [" in where else f"{path}:{n}", obj) for where, n, obj in found
        ]
        return list(dict.fromkeys(k for _, obj in records for k in obj)), records
    rows = [
        (n, r) for n, r in _delimited_rows(path) if r and any(field.strip() for field in r)
    ]  # blank lines
    if not rows:
        raise ScratchLLMError(f"{path} has no records")
    if header:
        (_, columns), rows = rows[0], rows[1:]
        columns = [c.strip() for c in columns]
        if not rows:
            raise ScratchLLMError(f"{path} has a header ({', '.join(columns)}) but no records below it")
    else:
        columns = [str(i) for i in range(max(len(r) for _, r in rows))]
    keys = _unique_keys(columns)
    for name, what in wanted:
        if columns.count(name) > 1:  # which one was meant cannot be known
            places = [i for i, c in enumerate(columns) if c == name]
            raise ScratchLLMError(
                f"{path}: the header names {len(places)} columns {name!r} (columns "
                f"{', '.join(str(i + 1) for i in places)}); rename them, or pass --{what}-column "
                f"{keys[places[1]]} for the second"
            )
    records = []
    for n, row in rows:
        if len(row) > len(columns):
            raise ScratchLLMError(
                f"{path}:{n}: {len(row)} fields but the header names {len(columns)} columns"
                + ("; a text with tabs needs a .csv or .jsonl file" if suffix in TSV_SUFFIXES else "")
            )
        records.append((f"{path}:{n}", dict(zip(keys, row))))
    return keys, records


def _delimited_rows(path: Path) -> list[tuple[int, list[str]]]:
    """The (line number, fields) of a CSV file (standard quoting) or a TSV file (tabs; quotes are text)."""
    text = _read_text(path).removeprefix("\ufeff")  # a byte-order mark (Excel's UTF-8 CSV) is not text
    if path.suffix.lower() != ".csv":
        return [(i, line.split("\t")) for i, line in enumerate(text.splitlines(), 1)]
    reader = csv.reader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise ScratchLLMError(f"{path}:{reader.line_num}: bad CSV ({e})") from e
    return rows


def _unique_keys(columns: list[str]) -> list[str]:
    """The header's names, a repeated one as NAME.1, NAME.2, ... (skipping names the header has itself)."""
    keys: list[str] = []
    for c in columns:
        key, k = c, 0
        while key in keys or (k and key in columns):
            k += 1
            key = f"{c}.{k}"
        keys.append(key)
    return keys


def read_examples(
    path: str | os.PathLike, text_column: str = "text", label_column: str = "label", header: bool = True
) -> list[Example]:
    """Labelled examples from a table; errors name the file, line and column."""
    wanted = ((text_column, "text"), (label_column, "label"))
    columns, records = read_table(path, header, wanted)
    for col, what in wanted:
        _check_column(path, columns, col, what, header)
    out = []
    for source, rec in records:
        text, label = rec.get(text_column), rec.get(label_column)
        _check_scalar(source, text, text_column, "text")
        _check_scalar(source, label, label_column, "label")
        if text is None or not str(text).strip():
            raise ScratchLLMError(
                f"{source}: empty text in column {text_column!r}; fill it in or drop the line"
            )
        if label is None or (isinstance(label, str) and not label.strip()):
            raise ScratchLLMError(f"{source}: no label in column {label_column!r}")
        out.append(Example(str(text), _label_name(label), source))
    return out


def _check_column(path: str | os.PathLike, columns: list[str], name: str, what: str, header: bool) -> None:
    if name not in columns:
        raise ScratchLLMError(
            f"{path}: no {what} column {name!r}; the columns are {columns}; "
            f"pass --{what}-column NAME" + ("" if header else " (a 0-based position without a header)")
        )


def read_texts(
    path: str | os.PathLike, text_column: str = "text", header: bool = True
) -> list[tuple[str, dict[str, Any]]]:
    """(text, whole record) pairs of a table, for classifying unlabelled records."""
    columns, records = read_table(path, header, [(text_column, "text")])
    _check_column(path, columns, text_column, "text", header)
    out = []
    for source, rec in records:
        text = rec.get(text_column)
        _check_scalar(source, text, text_column, "text")
        if text is None or not str(text).strip():
            raise ScratchLLMError(f"{source}: empty text in column {text_column!r}")
        out.append((str(text), rec))
    return out


def _check_scalar(source: str, value: Any, column: str, what: str) -> None:
    if isinstance(value, (list, dict)):
        raise ScratchLLMError(
            f"{source}: the {what} in {column!r} is a JSON {type(value).__name__}; it must be a string"
            + (" (or a number)" if what == "label" else "")
        )


def _label_name(label: Any) -> str:
    # JSON labels may be numbers or booleans; they become names so every split maps alike
    if isinstance(label, bool):
        return "true" if label else "false"
    if isinstance(label, float) and label.is_integer():
        return str(int(label))
    return str(label).strip()


class LabelSet:
    """Class names <-> ids 0..N-1, saved with the model so predictions come back as names."""

    def __init__(self, names: Sequence[str], source: str = "--labels"):
        """`source` says where the names come from, for the errors."""
        names = [str(n) for n in names]
        if len(set(names)) != len(names):
            raise ScratchLLMError(f"{source}: labels must be distinct, got {names}")
        if len(names) < 2:
            fix = "add examples of the other classes" if source == "the training data" else "name every class"
            raise ScratchLLMError(
                f"a classifier needs at least two classes, {source} has only {names}; {fix}"
            )
        self.names = names
        self.ids = {n: i for i, n in enumerate(names)}

    @classmethod
    def from_examples(cls, examples: Sequence[Example]) -> LabelSet:
        """The labels seen in training, sorted (numerically when they are all integers: 2 before 10)."""
        found = sorted(
            {e.label for e in examples}, key=lambda s: (0, int(s), "") if _is_int(s) else (1, 0, s)
        )
        by_case: dict[str, list[str]] = {}
        for name in found:
            by_case.setdefault(name.casefold(), []).append(name)
        for same in (names for names in by_case.values() if len(names) > 1):
            warnings.warn(
                f"the labels {' and '.join(map(repr, same))} differ only in case, so they are separate "
                "classes; make them one spelling in the data if they mean the same",
                stacklevel=2,
            )
        return cls(found, "the training data")

    def __len__(self) -> int:
        return len(self.names)

    def encode(self, examples: Sequence[Example], split: str = "data") -> np.ndarray:
        """Class ids of `examples`; a label unknown to the classifier is an error naming the line."""
        out = np.empty(len(examples), dtype=np.int64)
        for i, e in enumerate(examples):
            if e.label not in self.ids:
                raise ScratchLLMError(
                    f"{e.source or split}: label {e.label!r} in the {split} split is not one of the "
                    f"classifier's classes {self.names}; fix the label or add it to the training data"
                )
            out[i] = self.ids[e.label]
        return out


def _is_int(s: str) -> bool:
    try:
        int(s)
    except ValueError:
        return False
    return True


def split_by_fractions(
    examples: Sequence[Example], fractions: Sequence[float], seed: int
) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle with `seed`, then cut train/val/test by fractions, as the book does: the first
    int(n * train) examples, the next int(n * val), the rest as test. The rounding goes to the last
    split whose fraction is not 0 (the book's test), so a split of fraction 0 stays empty."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ScratchLLMError(
            "split fractions must be three numbers >= 0 summing to 1 (train, val, test), got "
            f"{list(fractions)}"
        )
    order = np.random.RandomState(seed).permutation(len(examples))
    shuffled = [examples[i] for i in order]
    last = max(i for i, f in enumerate(fractions) if f > 0)
    sizes = [int(len(shuffled) * f) if i < last else 0 for i, f in enumerate(fractions)]
    sizes[last] = len(shuffled) - sum(sizes)
    n_train, n_val = sizes[0], sizes[1]
    return shuffled[:n_train], shuffled[n_train : n_train + n_val], shuffled[n_train + n_val :]


def balance_classes(examples: Sequence[Example], seed: int) -> list[Example]:
    """The book's balanced set: every example of the rarest class, and as many of each other class
    drawn at random (without replacement) with `seed`; ordered class by class, majority first."""
    if not examples:
        raise ScratchLLMError("no examples to balance; give a data file with labelled texts")
    by_label: dict[str, list[Example]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    n = min(len(v) for v in by_label.values())
    out: list[Example] = []
    for label in sorted(by_label, key=lambda k: -len(by_label[k])):
        group = by_label[label]
        if len(group) > n:
            picked = np.random.RandomState(seed).choice(len(group), n, replace=False)
            group = [group[i] for i in picked]
        out.extend(group)
    return out


def class_counts(examples: Sequence[Example]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in examples:
        counts[e.label] = counts.get(e.label, 0) + 1
    return dict(sorted(counts.items()))
