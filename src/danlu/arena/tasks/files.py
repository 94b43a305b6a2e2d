"""Reading the user's own data files (CSV or JSON Lines) and splitting them by class.

Every mistake is a ``ValueError`` (or ``FileNotFoundError``) whose message names
the option (``data``, ``target``, ...) and what was wrong, raised while the task
is prepared, before any training.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

MIN_PER_CLASS = 3  # one example each for train, validation and test
JSON_LINES_SUFFIXES = (".jsonl", ".json", ".ndjson")


def check_file(name: str, path: Any) -> Path:
    """``path`` as a Path to an existing file; else an error that names option ``name``."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise TypeError(f"{name} must be a file path, got {type(path).__name__} {path!r}")
    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"{name}: no such file: {str(file)!r}")
    if not file.is_file():
        raise ValueError(f"{name}: {str(file)!r} is not a file")
    return file


def check_column_name(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must name a column of the data file, got {value!r}")
    return value


def file_digest(path: Path) -> str:
    """A short hash of the file's bytes: finished runs are reused only for the same data."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def read_records(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Column names and rows of a CSV file (header line first) or a JSON Lines file (one object per line)."""
    if path.suffix.lower() in JSON_LINES_SUFFIXES:
        return _read_json_lines(path)
    return _read_csv(path)


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            lines = list(csv.reader(handle))
    except UnicodeDecodeError as exc:
        raise ValueError(f"data: {path.name} is not UTF-8 text ({exc.reason})") from None
    lines = [line for line in lines if any(cell.strip() for cell in line)]
    if len(lines) < 2:
        raise ValueError(f"data: {path.name} needs a header line and at least one row")
    header = [cell.strip() for cell in lines[0]]
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if len(line) != len(header):
            raise ValueError(f"data: {path.name} line {number} has {len(line)} fields, the header has {len(header)}")
        rows.append(dict(zip(header, line, strict=True)))
    return header, rows


def _read_json_lines(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    rows = []
    header: dict[str, None] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"data: {path.name} line {number} is not JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"data: {path.name} line {number} is not a JSON object")
            header.update(dict.fromkeys(row))
            rows.append(row)
    if not rows:
        raise ValueError(f"data: {path.name} has no rows")
    return list(header), rows


def require_column(option: str, column: str, header: Sequence[str], path: Path) -> None:
    if column not in header:
        raise ValueError(f"{option}: no column {column!r} in {path.name}; its columns are: {', '.join(header)}")


def class_labels(option: str, column: str, rows: Sequence[dict[str, Any]], path: Path) -> tuple[list[str], list[int]]:
    """The sorted class names of ``column`` and each row's class index; single classes and tiny classes are errors."""
    values = []
    for number, row in enumerate(rows, start=1):
        value = row.get(column)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise ValueError(f"{option}: row {number} of {path.name} has no value in column {column!r}")
        values.append(str(value).strip())
    classes = sorted(set(values))
    if len(classes) < 2:
        raise ValueError(f"{option}: column {column!r} of {path.name} has a single class ({classes[0]!r}); "
                         "a classifier needs at least two")
    counts = {name: values.count(name) for name in classes}
    small = [name for name in classes if counts[name] < MIN_PER_CLASS]
    if small:
        raise ValueError(f"{option}: class {small[0]!r} of column {column!r} has {counts[small[0]]} row(s); a "
                         f"stratified train/validation/test split needs at least {MIN_PER_CLASS} of each class")
    index = {name: i for i, name in enumerate(classes)}
    return classes, [index[v] for v in values]


def stratified_split(labels: Sequence[int], fraction: float = 0.2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Row indices of train, val and test: ``fraction`` of every class each in val and test (at least one)."""
    generator = torch.Generator().manual_seed(seed)
    target = torch.tensor(labels)
    parts: dict[str, list[torch.Tensor]] = {"train": [], "val": [], "test": []}
    for label in sorted(set(labels)):
        rows = torch.nonzero(target == label).flatten()
        rows = rows[torch.randperm(len(rows), generator=generator)]
        held = max(1, round(fraction * len(rows)))
        parts["val"].append(rows[:held])
        parts["test"].append(rows[held: 2 * held])
        parts["train"].append(rows[2 * held:])
    return {name: torch.sort(torch.cat(chunks)).values for name, chunks in parts.items()}
