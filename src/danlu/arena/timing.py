"""Step time measured apart from training, so that it can be compared between optimizers.

Training runs are timed too, but they share the machine with each other (and
with whatever else runs), so their clocks drift by tens of percent between
identical runs. Here every optimizer, at its chosen lr, trains the same model in
one process with a fixed number of threads: a few warm-up steps, then rounds of
steps taken in turn (optimizer A, B, C, ..., A, B, C, ...), so that a slow
moment of the machine falls on all of them alike. The reported time is the
median over rounds; the spread is the interquartile range of the rounds over
their median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from danlu.arena.records import RunKey
from danlu.arena.runner import build
from danlu.arena.summary import StepTiming
from danlu.arena.tasks.base import Task

WARMUP_STEPS = 10
ROUNDS = 9
ROUND_SECONDS = 0.02  # each round lasts about this long per optimizer (at least one step, at most 50)
MAX_STEPS_PER_ROUND = 50
INTERLEAVE_PARAMETERS = 50_000_000  # above this many parameters in all, optimizers are timed one after another


@dataclass
class _Setup:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator[Any]


def _step(task: Task, setup: _Setup) -> None:
    loss = task.loss(setup.model, next(setup.batches))
    setup.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    setup.optimizer.step()


def _setup(task: Task, spec: str, lr: float, settings: dict[str, Any]) -> _Setup:
    model, optimizer = build(task, RunKey(spec, lr, 0), settings)
    model.train()
    return _Setup(model, optimizer, task.batches(0))


def _time_steps(task: Task, setup: _Setup, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        _step(task, setup)
    return (time.perf_counter() - started) / steps


def _warm(task: Task, setup: _Setup) -> float:
    """Take the warm-up steps; return the median time of the second half of them."""
    for _ in range(WARMUP_STEPS - WARMUP_STEPS // 2):
        _step(task, setup)
    return statistics.median(_time_steps(task, setup, 1) for _ in range(WARMUP_STEPS // 2))


def measure_step_times(task: Task, picks: Sequence[tuple[str, float, dict[str, Any]]], threads: int) -> dict[
        str, StepTiming]:
    """Median training-step time of each ``(spec, lr, settings)``, measured in turn with ``threads`` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if not picks:
            return {}
        setups = {spec: _setup(task, spec, lr, settings) for spec, lr, settings in picks[:1]}
        size = sum(p.numel() for p in setups[picks[0][0]].model.parameters())
        if size * len(picks) > INTERLEAVE_PARAMETERS:
            return {spec: _measure(task, {spec: _setup(task, spec, lr, settings)})[spec]
                    for spec, lr, settings in picks}
        setups.update({spec: _setup(task, spec, lr, settings) for spec, lr, settings in picks[1:]})
        return _measure(task, setups)
    finally:
        torch.set_num_threads(previous)


def _measure(task: Task, setups: dict[str, _Setup]) -> dict[str, StepTiming]:
    estimate = statistics.median(_warm(task, setup) for setup in setups.values())
    steps = max(1, min(MAX_STEPS_PER_ROUND, int(ROUND_SECONDS / max(estimate, 1e-9))))
    rounds: dict[str, list[float]] = {spec: [] for spec in setups}
    order = list(setups)
    for index in range(ROUNDS):
        shift = index % len(order)
        for spec in order[shift:] + order[:shift]:
            rounds[spec].append(_time_steps(task, setups[spec], steps))
    timings = {}
    for spec, values in rounds.items():
        median = statistics.median(values)
        quartiles = statistics.quantiles(values, n=4)
        timings[spec] = StepTiming(median_ms=1000 * median, spread=(quartiles[2] - quartiles[0]) / median,
                                   rounds=ROUNDS, steps_per_round=steps)
    return timings
