"""danlu arena: compare optimizers on a real task, fairly, with curves and a report.

Two entry points:

- :func:`run` trains your own model on your own tensors::

      import danlu.arena
      result = danlu.arena.run(
          lambda: torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3)),
          {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)},
          optimizers="adamw,ranger,lamb", steps=300, out="my-arena",
      )
      print(result.chosen_lrs)

- :func:`run_task` runs a bundled task ("digits", "ner-zh", "sentiment-en"), or
  a CSV table ("csv") or a text classification with a local Hugging Face model
  ("text"), as ``danlu arena`` does.

Both sweep each optimizer's learning rate on the validation split, train
several seeds at the chosen lr with the same data order for everyone, recommend
an optimizer (and name those the seeds cannot tell apart from it), and write a
report folder (HTML, Markdown, CSV, JSON). Finished runs are kept on disk:
rerunning with the same ``out`` resumes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from danlu.arena.arena import Arena, ArenaConfig, ArenaResult, make_config, preflight, run_config
from danlu.arena.decision import Recommendation
from danlu.arena.progress import Progress, RichProgress
from danlu.arena.roster import DEFAULT_LR_EXTEND, DEFAULT_LR_GRID, DEFAULT_ROSTER, TYPICAL_LR
from danlu.arena.tasks import TASKS, Evaluation, Task, TaskDefaults, TaskInfo, TensorTask, make_task
from danlu.arena.tasks.tensors import LossFn, MetricFn, Split

__all__ = [
    "run",
    "run_task",
    "make_task",
    "make_config",
    "run_config",
    "preflight",
    "Arena",
    "ArenaConfig",
    "ArenaResult",
    "Recommendation",
    "Task",
    "TaskDefaults",
    "TaskInfo",
    "Evaluation",
    "TensorTask",
    "TASKS",
    "DEFAULT_ROSTER",
    "DEFAULT_LR_GRID",
    "TYPICAL_LR",
]


def _progress(show: bool) -> Progress:
    return RichProgress() if show else Progress()


def run(
    model_fn: Callable[[], nn.Module],
    data: Mapping[str, Split],
    *,
    loss_fn: LossFn | None = None,
    metric: str | MetricFn = "accuracy",
    higher_is_better: bool | None = None,
    target: float | None = None,
    batch_size: int = 64,
    optimizers: str | Iterable[str] | None = None,
    steps: int = 200,
    seeds: int = 3,
    lr_grid: str | Sequence[float] | None = None,
    eval_every: int | None = None,
    out: str | os.PathLike[str] = "danlu-arena",
    hyperparameters: Mapping[str, Mapping[str, Any]] | None = None,
    threads: int | None = None,
    resume: bool = True,
    progress: bool = True,
    name: str = "custom",
    lr_extend: int = DEFAULT_LR_EXTEND,
    workers: int | None = None,
    backend: str = "local",
    ray_address: str | None = None,
) -> ArenaResult:
    """Compare optimizers on your own model and data and write the report to ``out``.

    Args:
        model_fn: builds a fresh model; called once per run after seeding torch.
        data: ``{"train": (x, y), "val": (x, y), "test": (x, y)}`` ("test" optional);
            batches are rows of ``x`` and ``y``.
        loss_fn: ``(outputs, targets) -> scalar``; default cross-entropy.
        metric: "accuracy", "loss", or ``(outputs, targets) -> float``.
        higher_is_better: direction of a callable metric (default True).
        target: metric value for the "steps to target" column (optional).
        optimizers: ``create_optimizer`` specs, comma-separated or a list; default: the broad roster.
        steps, seeds, batch_size, eval_every: the budget.
        lr_grid: multipliers of each optimizer's typical lr to sweep (default 0.1 ... 10).
        hyperparameters: extra settings per spec, e.g. ``{"adamw+ema": {"ema_momentum": 0.99}}``.
        out: report folder; finished runs there are reused when ``resume`` is true.
        progress: show live progress on stderr.
        lr_extend: extra lrs the sweep may add beyond an edge of the grid where the best lr sits (0: never).
        workers: runs trained at once in worker processes (default: the cores, capped by the runs).
        backend, ray_address: "ray" trains each run as a Ray task on the cluster at ``ray_address``
            (a local Ray instance by default).

    Returns:
        An :class:`ArenaResult` with the table rows, the recommendation, every run and the report's file paths.
    """
    task = TensorTask(model_fn, data, name=name, loss_fn=loss_fn, metric=metric,
                      higher_is_better=higher_is_better, target=target, batch_size=batch_size,
                      defaults=TaskDefaults(steps=steps, seeds=seeds))
    config = make_config(task, optimizers=optimizers, steps=steps, seeds=seeds, lr_grid=lr_grid,
                         eval_every=eval_every, out=out, hyperparameters=hyperparameters,
                         threads=threads, resume=resume, lr_extend=lr_extend, workers=workers, backend=backend,
                         ray_address=ray_address)
    return run_config(config, _progress(progress))


def run_task(
    task: str | Task = "digits",
    *,
    task_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    **options: Any,
) -> ArenaResult:
    """Run a bundled task by name (or a :class:`Task` instance); ``options`` as in :func:`make_config`."""
    instance = task if isinstance(task, Task) else make_task(task, **dict(task_options or {}))
    config = make_config(instance, **options)
    return run_config(config, _progress(progress))
