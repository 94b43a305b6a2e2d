"""What a task gives the arena: data, a model, a loss and a metric.

A task owns its data splits (train, validation, test) and knows how to build a
fresh model for a seed, draw a training batch from a seeded generator, compute
the training loss, and evaluate a model on a split. The arena owns everything
else (optimizers, learning rates, seeds, timing, the report), so every task gets
the same fair treatment.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class TaskDefaults:
    """Budget a task runs with when the user does not say otherwise."""

    steps: int
    seeds: int = 3
    eval_every: int | None = None
    lr_grid: tuple[float, ...] = (0.1, 0.316, 1.0, 3.16, 10.0)
    threads: int | None = None


@dataclass(frozen=True)
class Evaluation:
    """Loss and metric of a model on one split."""

    loss: float
    metric: float


@dataclass(frozen=True)
class Baseline:
    """The metric of the trivial predictor on a split, and how far past it a run must get to count as learning.

    A run whose final metric is not better than ``value + margin`` (``value - margin``
    when lower is better) is *stuck at chance*: it is marked and never chosen.
    """

    value: float
    margin: float

    def stuck(self, metric: float, higher_is_better: bool) -> bool:
        if not math.isfinite(metric):
            return True
        return metric <= self.value + self.margin if higher_is_better else metric >= self.value - self.margin


def accuracy_baseline(rate: float, examples: int) -> Baseline:
    """Chance for accuracy: the majority-class ``rate``.

    The margin is two binomial standard errors (at least one example), but never
    more than a quarter of the way from chance to a perfect score, so that a run
    on a small evaluation split can still count as learning.
    """
    n = max(1, examples)
    margin = min(max(2 * math.sqrt(rate * (1 - rate) / n), 1 / n), (1 - rate) / 4)
    return Baseline(rate, margin)


def majority_baseline(train_labels: torch.Tensor, labels: torch.Tensor) -> Baseline:
    """Accuracy of always answering the most common training label, on ``labels``."""
    majority = int(torch.bincount(train_labels.flatten()).argmax())
    return accuracy_baseline(float((labels == majority).float().mean()), len(labels))


@dataclass
class TaskInfo:
    """Human-readable description of a task for the report."""

    title: str
    data: str
    model: str
    metric_label: str
    notes: list[str] = field(default_factory=list)


class Task(abc.ABC):
    """Base class of an arena task.

    Subclasses set the class attributes and implement the abstract methods.
    ``prepare()`` is called once before any training; it loads data and raises
    ``ValueError`` (naming the option) or ``FileNotFoundError`` for bad input,
    so that errors surface before the first step.
    """

    name: str = "task"
    metric: str = "accuracy"
    higher_is_better: bool = True
    target: float | None = None
    lr_scale: float = 1.0  # multiplies every optimizer's typical lr for this task
    defaults: TaskDefaults = TaskDefaults(steps=200)

    def prepare(self) -> None:
        """Load data and build anything shared by every run (idempotent); nothing to do by default."""
        return None

    @abc.abstractmethod
    def info(self) -> TaskInfo:
        """Describe the task, its data and its model for the report."""

    @abc.abstractmethod
    def make_model(self, seed: int) -> nn.Module:
        """Build a fresh model; the caller has already seeded torch with ``seed``."""

    @abc.abstractmethod
    def batches(self, seed: int) -> Iterator[Any]:
        """Endless training batches, in an order that depends on ``seed`` only."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Training loss of ``model`` on ``batch`` (a scalar tensor)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, split: str) -> Evaluation:
        """Loss and metric on ``split`` ("val" or "test"), in eval mode, without gradients."""

    def optimizer_parameters(self, model: nn.Module) -> Any:
        """What ``create_optimizer`` gets: the model, or the ``(name, parameter)`` pairs to train."""
        return model

    def baseline(self, split: str) -> Baseline | None:
        """The trivial predictor's metric on ``split`` (e.g. the majority class); None when there is none."""
        return None

    def has_split(self, split: str) -> bool:
        """Whether the task has ``split`` ("val" always; "test" usually)."""
        return True

    def fingerprint(self) -> dict[str, Any]:
        """Everything that changes results; finished runs are reused only when it matches."""
        return {"task": self.name}

    def better(self, a: float, b: float) -> bool:
        """Whether metric value ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def reached(self, value: float) -> bool:
        """Whether metric ``value`` reaches the task's target."""
        if self.target is None:
            return False
        return value >= self.target if self.higher_is_better else value <= self.target


def split_indices(n: int, val: int, test: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed random split of ``range(n)`` into train, validation and test indices."""
    if val + test >= n:
        raise ValueError(f"data set of {n} examples is too small for {val} validation and {test} test examples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[val + test :], order[:val], order[val : val + test]


def epoch_batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless index batches: a fresh shuffle of ``range(n)`` each epoch, seeded by ``seed``.

    The last partial batch of an epoch is dropped, so every batch has the same size.
    """
    generator = torch.Generator().manual_seed(10_007 + seed)
    size = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - size + 1, size):
            yield order[start : start + size]
