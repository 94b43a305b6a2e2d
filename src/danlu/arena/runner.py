"""One training run: a task, an optimizer spec, a learning rate and a seed."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from danlu.arena.records import Curve, RunKey, RunRecord
from danlu.arena.tasks.base import Evaluation, Task
from danlu.factory import create_optimizer

#: Called after every training step with (step, steps, smoothed loss).
StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class RunPlan:
    """How long to train and how often to look."""

    steps: int
    eval_every: int
    log_every: int


def log_every_for(steps: int) -> int:
    """Log the training loss about 100 times per run, whatever its length."""
    return max(1, steps // 100)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor the optimizer keeps in its state (nested containers included)."""

    def walk(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        return 0

    return sum(walk(state) for state in optimizer.state.values())


def evaluate(task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, split: str, steps_done: int) -> Evaluation:
    """Evaluate ``model`` on ``split`` in eval mode, with EMA weights swapped in where there are any.

    Before the optimizer has applied a step (step 0, or while a gradient-accumulating
    optimizer is still buffering) there is no average yet: the current weights are used.
    """
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            ema = getattr(optimizer, "ema_weights", None)
            if callable(ema) and steps_done > 0:
                with contextlib.suppress(RuntimeError, ValueError):
                    stack.enter_context(ema())
            return task.evaluate(model, split)
    finally:
        model.train()


def build(task: Task, key: RunKey, hyperparameters: dict[str, Any]) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh model (seeded) and its optimizer."""
    torch.manual_seed(key.seed)
    model = task.make_model(key.seed)
    optimizer = create_optimizer(task.optimizer_parameters(model), key.spec, lr=key.lr, **hyperparameters)
    return model, optimizer


class _LossWindow:
    """Mean of the training loss over the last logging window."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1

    def take(self) -> float:
        mean = self.total / max(1, self.count)
        self.total, self.count = 0.0, 0
        return mean


def train_run(
    task: Task,
    key: RunKey,
    plan: RunPlan,
    hyperparameters: dict[str, Any],
    fingerprint: str,
    on_step: StepCallback | None = None,
) -> RunRecord:
    """Train one model from scratch and measure it; a non-finite loss stops the run as diverged."""
    started = time.perf_counter()
    model, optimizer = build(task, key, hyperparameters)
    model.train()
    batches: Iterator[Any] = task.batches(key.seed)
    torch.manual_seed(1_000_003 + key.seed)  # dropout and other in-model randomness
    train, evals = Curve(), Curve()
    first = evaluate(task, model, optimizer, "val", 0)
    _log_eval(evals, 0, 0.0, first)
    window, step_times, train_time = _LossWindow(), [], 0.0
    steps_to_target, diverged, step = None, False, 0
    for step in range(1, plan.steps + 1):
        batch = next(batches)
        tick = time.perf_counter()
        loss = task.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = float(loss.detach())
        elapsed = time.perf_counter() - tick
        step_times.append(elapsed)
        train_time += elapsed
        window.add(value)
        if not math.isfinite(value):
            diverged = True
        if step % plan.log_every == 0 or step == plan.steps or diverged:
            _log_train(train, step, train_time, window.take())
        if on_step is not None:
            on_step(step, plan.steps, value)
        if diverged:
            break
        if step % plan.eval_every == 0 or step == plan.steps:
            result = evaluate(task, model, optimizer, "val", step)
            _log_eval(evals, step, train_time, result)
            if steps_to_target is None and task.reached(result.metric):
                steps_to_target = step
    final = _final_val(task, model, optimizer, evals, step, train_time, diverged)
    test = evaluate(task, model, optimizer, "test", step) if task.has_split("test") else None
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return RunRecord(
        spec=key.spec, lr=key.lr, seed=key.seed, fingerprint=fingerprint,
        hyperparameters={k: _jsonable(v) for k, v in hyperparameters.items()},
        steps=step, train=train, evals=evals,
        val_loss=final.loss, val_metric=final.metric,
        test_loss=None if test is None else test.loss, test_metric=None if test is None else test.metric,
        step_time_s=statistics.median(step_times) if step_times else math.nan,
        state_bytes_per_param=state_bytes(optimizer) / max(1, n_params), n_params=n_params,
        diverged=diverged, steps_to_target=steps_to_target, wall_s=time.perf_counter() - started,
        state_bytes=state_bytes(optimizer),
    )


def _final_val(
    task: Task, model: nn.Module, optimizer: torch.optim.Optimizer, evals: Curve, step: int, train_time: float,
    diverged: bool,
) -> Evaluation:
    """The validation result at the last step (evaluated now if the loop did not just do it)."""
    if evals.step and evals.step[-1] == step:
        return Evaluation(loss=evals.loss[-1], metric=evals.metric[-1])
    result = evaluate(task, model, optimizer, "val", step)
    if diverged:
        result = Evaluation(loss=math.nan, metric=result.metric)
    _log_eval(evals, step, train_time, result)
    return result


def _log_train(curve: Curve, step: int, time_s: float, loss: float) -> None:
    curve.step.append(step)
    curve.time.append(round(time_s, 6))
    curve.loss.append(loss)


def _log_eval(curve: Curve, step: int, time_s: float, result: Evaluation) -> None:
    curve.step.append(step)
    curve.time.append(round(time_s, 6))
    curve.loss.append(result.loss)
    curve.metric.append(result.metric)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return repr(value)
