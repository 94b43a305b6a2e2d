"""`digits`: scikit-learn's bundled handwritten digits, a small MLP, the default task."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from danlu.arena.tasks.base import TaskDefaults, TaskInfo, split_indices
from danlu.arena.tasks.tensors import Split, TensorTask


def load_digits_splits() -> dict[str, Split]:
    """The 1,797 8x8 images scaled to [0, 1], split 1,077 / 360 / 360 (fixed)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise FileNotFoundError("task 'digits' needs scikit-learn: pip install 'danlu[arena]'") from exc
    bunch = load_digits()
    inputs = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(bunch.target, dtype=torch.long)
    train, val, test = split_indices(len(inputs), 360, 360)
    return {"train": (inputs[train], targets[train]), "val": (inputs[val], targets[val]),
            "test": (inputs[test], targets[test])}


class DigitsTask(TensorTask):
    """Classify 8x8 digits with a 64-64-10 MLP, cross-entropy loss, accuracy metric."""

    lr_scale = 10.0  # a short run of a small network wants larger steps than the usual defaults

    def __init__(self, *, batch_size: int = 32, hidden: int = 64, target: float = 0.9) -> None:
        self.hidden = hidden
        super().__init__(
            self._build, load_digits_splits, name="digits", metric="accuracy", target=target,
            batch_size=batch_size, defaults=TaskDefaults(steps=150, seeds=3, eval_every=5, threads=1),
        )

    def _build(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 10))

    def info(self) -> TaskInfo:
        return TaskInfo(
            title="digits: handwritten digit classification",
            data="scikit-learn's bundled digits (1,797 8x8 images, human-labelled); "
                 "1,077 train / 360 validation / 360 test, fixed split",
            model=f"MLP 64-{self.hidden}-10 with ReLU, cross-entropy, batch {self.batch_size}",
            metric_label="accuracy",
            notes=[f"Steps to target: first evaluation step with validation accuracy >= {self.target:g}."],
        )

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "hidden": self.hidden, "target": self.target}
