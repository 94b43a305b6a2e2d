"""`csv`: the user's own table (numeric features and a label column), classified by a small MLP."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from danlu.arena._checks import check_positive_int
from danlu.arena.tasks.base import TaskDefaults, TaskInfo
from danlu.arena.tasks.files import (
    check_column_name,
    check_file,
    class_labels,
    file_digest,
    read_records,
    require_column,
    stratified_split,
)
from danlu.arena.tasks.tensors import Split, TensorTask


class CsvTask(TensorTask):
    """Classify the rows of a CSV (or JSON Lines) file by its ``target`` column from every other column.

    Features are standardised with the training split's mean and deviation; the
    split is stratified (20% of each class for validation, 20% for test).
    """

    def __init__(self, *, data: str | os.PathLike[str] | None = None, target: str | None = None,
                 batch_size: int = 32, hidden: int = 64) -> None:
        if data is None or target is None:
            raise ValueError("task 'csv' needs a data file and its label column: --data FILE --target COLUMN")
        self.path = check_file("data", data)
        self.target_column = check_column_name("target", target)
        self.hidden = check_positive_int("hidden", hidden)
        self.classes: list[str] = []
        self.features: list[str] = []
        self.rows = 0
        self._digest = ""
        super().__init__(self._build, self._load, name="csv", metric="accuracy", batch_size=batch_size,
                         defaults=TaskDefaults(steps=200, seeds=3, eval_every=10, threads=1))

    def _load(self) -> dict[str, Split]:
        header, rows = read_records(self.path)
        require_column("target", self.target_column, header, self.path)
        self.features = [name for name in header if name != self.target_column]
        if not self.features:
            raise ValueError(f"data: {self.path.name} has no feature column besides the target "
                             f"{self.target_column!r}")
        self.classes, labels = class_labels("target", self.target_column, rows, self.path)
        inputs = torch.tensor([[self._number(row, name, i) for name in self.features] for i, row in enumerate(rows, 1)],
                              dtype=torch.float32)
        targets = torch.tensor(labels, dtype=torch.long)
        self.rows, self._digest = len(rows), file_digest(self.path)
        split = stratified_split(labels)
        mean = inputs[split["train"]].mean(0)
        scale = inputs[split["train"]].std(0, unbiased=False).clamp_min(1e-12)
        scaled = (inputs - mean) / scale
        return {name: (scaled[index], targets[index]) for name, index in split.items()}

    def _number(self, row: dict[str, Any], name: str, number: int) -> float:
        value = row.get(name)
        try:
            result = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            result = math.nan
        if not math.isfinite(result) or isinstance(value, bool):
            raise ValueError(f"data: column {name!r} of {self.path.name} is not numeric (row {number}: {value!r}); "
                             f"every column but the target {self.target_column!r} must hold finite numbers")
        return result

    def _build(self) -> nn.Module:
        return nn.Sequential(nn.Linear(len(self.features), self.hidden), nn.ReLU(),
                             nn.Linear(self.hidden, len(self.classes)))

    def info(self) -> TaskInfo:
        sizes = " / ".join(f"{len(self.data[name][0])} {label}" for name, label in
                           (("train", "train"), ("val", "validation"), ("test", "test")) if name in self.data)
        shown = ", ".join(self.classes[:8]) + (", ..." if len(self.classes) > 8 else "")
        return TaskInfo(
            title=f"csv: {self.path.name}, predicting {self.target_column!r}",
            data=f"{self.path} ({self.rows} rows, {len(self.features)} numeric features, {len(self.classes)} classes: "
                 f"{shown}); stratified split {sizes}; features standardised on the training split",
            model=f"MLP {len(self.features)}-{self.hidden}-{len(self.classes)} with ReLU, cross-entropy, "
                  f"batch {self.batch_size}",
            metric_label="accuracy",
        )

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "file": str(Path(self.path).resolve()), "digest": self._digest,
                "target": self.target_column, "hidden": self.hidden}
