"""What one training run leaves behind, and how it is saved and found again."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunKey:
    """One run: an optimizer spec at a learning rate with a seed."""

    spec: str
    lr: float
    seed: int

    def slug(self) -> str:
        """A file-name-safe, unique name for the run."""
        spec = re.sub(r"[^A-Za-z0-9_]+", "-", self.spec)
        return f"{spec}__lr{self.lr:.4g}__seed{self.seed}"

    def label(self) -> str:
        """Short human-readable name."""
        return f"{self.spec} lr={self.lr:.3g} seed={self.seed}"


@dataclass
class Curve:
    """Points logged during a run; ``time`` is cumulative training seconds (evaluation excluded)."""

    step: list[int] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    metric: list[float] = field(default_factory=list)


@dataclass
class RunRecord:
    """Everything measured in one run."""

    spec: str
    lr: float
    seed: int
    fingerprint: str
    hyperparameters: dict[str, Any]
    steps: int
    train: Curve
    evals: Curve
    val_loss: float
    val_metric: float
    test_loss: float | None
    test_metric: float | None
    step_time_s: float
    state_bytes_per_param: float
    n_params: int
    diverged: bool
    steps_to_target: int | None
    wall_s: float
    state_bytes: int = 0

    @property
    def key(self) -> RunKey:
        return RunKey(self.spec, self.lr, self.seed)

    @property
    def final_train_loss(self) -> float:
        return self.train.loss[-1] if self.train.loss else math.nan

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        data = dict(data)
        data["train"] = Curve(**data["train"])
        data["evals"] = Curve(**data["evals"])
        return cls(**data)


def fingerprint(config: dict[str, Any]) -> str:
    """A short stable hash of everything that changes a run's results."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _none_to_nan(value: Any) -> Any:
    if value is None:
        return math.nan
    if isinstance(value, list):
        return [_none_to_nan(v) for v in value]
    return value


class RunStore:
    """Finished runs, one JSON file each under ``<out>/runs/``, written atomically."""

    def __init__(self, out: Path) -> None:
        self.folder = Path(out) / "runs"

    def path(self, key: RunKey) -> Path:
        return self.folder / f"{key.slug()}.json"

    def save(self, record: RunRecord) -> None:
        """Write ``record``; a run interrupted while writing leaves no half file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(record.key)
        temporary = target.with_suffix(".tmp")
        temporary.write_text(json.dumps(_finite_or_none(record.to_json())), encoding="utf-8")
        os.replace(temporary, target)

    def load(self, key: RunKey, expected_fingerprint: str) -> RunRecord | None:
        """The finished run for ``key`` made with the same settings, or None."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if data.get("fingerprint") != expected_fingerprint:
            return None
        for name in ("val_loss", "val_metric"):
            data[name] = _none_to_nan(data.get(name))
        for name in ("train", "evals"):
            data[name] = {k: _none_to_nan(v) for k, v in data[name].items()}
        try:
            return RunRecord.from_json(data)
        except TypeError:
            return None
