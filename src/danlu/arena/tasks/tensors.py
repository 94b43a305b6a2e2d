"""A task over in-memory tensors: the user's own model and data, and the base of `digits`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from danlu.arena._checks import check_positive_int
from danlu.arena.tasks.base import (
    Baseline,
    Evaluation,
    Task,
    TaskDefaults,
    TaskInfo,
    epoch_batches,
    majority_baseline,
)

MetricFn = Callable[[torch.Tensor, torch.Tensor], float]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Split = tuple[torch.Tensor, torch.Tensor]


def accuracy(outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of rows whose arg-max equals the integer target."""
    return float((outputs.argmax(dim=-1) == targets).float().mean())


METRICS: dict[str, tuple[MetricFn | None, bool]] = {
    "accuracy": (accuracy, True),
    "loss": (None, False),
}


def _check_split(name: str, split: Any) -> Split:
    if not (isinstance(split, (tuple, list)) and len(split) == 2):
        raise TypeError(f"data[{name!r}] must be a pair (inputs, targets) of tensors, got {type(split).__name__}")
    inputs, targets = split
    if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"data[{name!r}] must hold tensors, got {type(inputs).__name__} and {type(targets).__name__}")
    if len(inputs) != len(targets) or len(inputs) == 0:
        raise ValueError(f"data[{name!r}] needs as many targets as inputs and at least one example, "
                         f"got {len(inputs)} inputs and {len(targets)} targets")
    return inputs, targets


def check_data(data: Any) -> dict[str, Split]:
    """Validate ``data``: a mapping with "train" and "val" (and optionally "test") pairs of tensors."""
    if not isinstance(data, Mapping):
        raise TypeError(
            f"data must be a mapping with keys 'train', 'val' and optionally 'test', got {type(data).__name__}"
        )
    unknown = set(data) - {"train", "val", "test"}
    if unknown:
        raise ValueError(f"data has unknown keys {sorted(unknown)}; valid keys: 'train', 'val', 'test'")
    for key in ("train", "val"):
        if key not in data:
            raise ValueError(f"data must have a {key!r} split")
    return {key: _check_split(key, value) for key, value in data.items()}


class TensorTask(Task):
    """Train ``model_fn()`` on tensor pairs with ``loss_fn`` and score it with ``metric``.

    ``metric`` is "accuracy", "loss" (the evaluation loss, lower is better) or a
    callable ``(outputs, targets) -> float``; for a callable, say whether higher
    is better with ``higher_is_better``.
    """

    def __init__(
        self,
        model_fn: Callable[[], nn.Module],
        data: Mapping[str, Split] | Callable[[], Mapping[str, Split]],
        *,
        name: str = "custom",
        loss_fn: LossFn | None = None,
        metric: str | MetricFn = "accuracy",
        higher_is_better: bool | None = None,
        target: float | None = None,
        batch_size: int = 64,
        defaults: TaskDefaults | None = None,
        info: TaskInfo | None = None,
    ) -> None:
        if not callable(model_fn):
            raise TypeError(f"model_fn must be a callable returning an nn.Module, got {type(model_fn).__name__}")
        self.model_fn = model_fn
        self._source = data
        self.data: dict[str, Split] = {} if callable(data) else check_data(data)
        self.name = name
        self.loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
        self.metric_fn, self.higher_is_better = self._resolve_metric(metric, higher_is_better)
        self.metric = metric if isinstance(metric, str) else getattr(metric, "__name__", "metric")
        self.target = target
        self.batch_size = check_positive_int("batch_size", batch_size)
        if defaults is not None:
            self.defaults = defaults
        self._info = info

    def prepare(self) -> None:
        if not self.data and callable(self._source):
            self.data = check_data(self._source())

    @staticmethod
    def _resolve_metric(metric: str | MetricFn, higher_is_better: bool | None) -> tuple[MetricFn | None, bool]:
        if isinstance(metric, str):
            if metric not in METRICS:
                raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)} or a callable")
            fn, default_higher = METRICS[metric]
            return fn, default_higher if higher_is_better is None else bool(higher_is_better)
        if not callable(metric):
            raise TypeError(f"metric must be a name or a callable, got {type(metric).__name__}")
        return metric, True if higher_is_better is None else bool(higher_is_better)

    def info(self) -> TaskInfo:
        if self._info is not None:
            return self._info
        sizes = ", ".join(f"{len(split[0])} {key}" for key, split in self.data.items())
        return TaskInfo(title=self.name, data=f"user data ({sizes})", model="user model", metric_label=self.metric)

    def make_model(self, seed: int) -> nn.Module:
        model = self.model_fn()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model_fn must return an nn.Module, got {type(model).__name__}")
        return model

    def batches(self, seed: int) -> Iterator[Split]:
        inputs, targets = self.data["train"]
        for index in epoch_batches(len(inputs), self.batch_size, seed):
            yield inputs[index], targets[index]

    def loss(self, model: nn.Module, batch: Split) -> torch.Tensor:
        inputs, targets = batch
        return self.loss_fn(model(inputs), targets)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> Evaluation:
        inputs, targets = self.data[split]
        outputs = torch.cat([model(chunk) for chunk in inputs.split(1024)])
        loss = float(self.loss_fn(outputs, targets))
        metric = loss if self.metric_fn is None else float(self.metric_fn(outputs, targets))
        return Evaluation(loss=loss, metric=metric)

    def has_split(self, split: str) -> bool:
        return split in self.data

    def baseline(self, split: str) -> Baseline | None:
        """Majority class for accuracy; for the "loss" metric, the loss of a constant prediction."""
        if split not in self.data or "train" not in self.data:
            return None
        train_targets, targets = self.data["train"][1], self.data[split][1]
        if self.metric == "accuracy" and not targets.is_floating_point() and targets.dim() == 1:
            return majority_baseline(train_targets, targets)
        if self.metric == "loss":
            value = self._constant_prediction_loss(train_targets, targets)
            return None if value is None else Baseline(value, 0.01 * abs(value))
        return None

    @torch.no_grad()
    def _constant_prediction_loss(self, train_targets: torch.Tensor, targets: torch.Tensor) -> float | None:
        """The loss of the best constant output: the training mean, or the log class frequencies."""
        if targets.is_floating_point():
            outputs = train_targets.mean(0, keepdim=True).expand_as(targets)
        else:
            classes = int(max(train_targets.max(), targets.max())) + 1
            counts = torch.bincount(train_targets.flatten(), minlength=classes).double() + 1.0
            outputs = (counts / counts.sum()).log().float().expand(len(targets), classes)
        try:
            return float(self.loss_fn(outputs, targets))
        except (RuntimeError, ValueError, TypeError):
            return None

    def fingerprint(self) -> dict[str, Any]:
        sizes = {key: len(split[0]) for key, split in self.data.items()}
        return {"task": self.name, "sizes": sizes, "batch_size": self.batch_size, "metric": self.metric}
