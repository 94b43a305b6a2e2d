"""From finished runs to the numbers of the report: chosen lrs, means, spreads, ranks."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from danlu.arena.records import RunRecord
from danlu.arena.tasks.base import Task


@dataclass
class SweepPoint:
    """One point of an lr-sensitivity curve: the validation metric at the end of the seed-0 run."""

    lr: float
    val_metric: float
    val_loss: float
    diverged: bool


@dataclass
class Row:
    """One optimizer's line in the results table."""

    spec: str
    lr: float | None
    lr_note: str
    sweep: list[SweepPoint]
    runs: list[RunRecord] = field(default_factory=list)
    seeds_planned: int = 0

    @property
    def complete(self) -> bool:
        return self.lr is not None and len(self.runs) >= self.seeds_planned

    def _values(self, attribute: str) -> list[float]:
        values = [getattr(run, attribute) for run in self.runs]
        return [float(v) for v in values if v is not None and math.isfinite(v)]

    @property
    def metric_values(self) -> list[float]:
        """The final metric of each seed: on the test split where the task has one, else validation."""
        test = [run.test_metric for run in self.runs]
        chosen = test if all(v is not None for v in test) else [run.val_metric for run in self.runs]
        return [float(v) if v is not None else math.nan for v in chosen]

    @property
    def metric_mean(self) -> float:
        values = self.metric_values
        return statistics.fmean(values) if values else math.nan

    @property
    def metric_std(self) -> float:
        values = self.metric_values
        return statistics.stdev(values) if len(values) > 1 else 0.0 if values else math.nan

    @property
    def train_loss_mean(self) -> float:
        values = [run.final_train_loss for run in self.runs]
        values = [v for v in values if math.isfinite(v)]
        return statistics.fmean(values) if values else math.nan

    @property
    def steps_to_target(self) -> float | None:
        """Median steps to target over the seeds that reached it, None if none did."""
        values = [run.steps_to_target for run in self.runs if run.steps_to_target is not None]
        return statistics.median(values) if values else None

    @property
    def reached(self) -> int:
        return sum(run.steps_to_target is not None for run in self.runs)

    @property
    def step_time_ms(self) -> float:
        values = self._values("step_time_s")
        return 1000 * statistics.median(values) if values else math.nan

    @property
    def state_bytes_per_param(self) -> float:
        values = self._values("state_bytes_per_param")
        return values[0] if values else math.nan

    @property
    def diverged(self) -> int:
        return sum(run.diverged for run in self.runs)


def sweep_points(records: Sequence[RunRecord]) -> list[SweepPoint]:
    """The sensitivity curve of one optimizer, sorted by lr."""
    points = [SweepPoint(r.lr, r.val_metric, r.val_loss, r.diverged) for r in records]
    return sorted(points, key=lambda point: point.lr)


def choose_lr(task: Task, points: Sequence[SweepPoint]) -> SweepPoint | None:
    """The best sweep point: best validation metric, ties broken by lower validation loss.

    Diverged or non-finite points never win unless every point is one.
    """
    usable = [p for p in points if not p.diverged and math.isfinite(p.val_metric)]
    if not usable:
        return min(points, key=lambda p: p.lr) if points else None
    best = usable[0]
    for point in usable[1:]:
        tie = point.val_metric == best.val_metric
        if task.better(point.val_metric, best.val_metric) or (tie and _loss(point) < _loss(best)):
            best = point
    return best


def _loss(point: SweepPoint) -> float:
    return point.val_loss if math.isfinite(point.val_loss) else math.inf


def lr_note(points: Sequence[SweepPoint], chosen: SweepPoint | None) -> str:
    """A warning when the chosen lr sits at the edge of the grid, or when the sweep failed."""
    if chosen is None:
        return "sweep not finished"
    if all(p.diverged for p in points):
        return "every lr diverged"
    if len(points) < 2:
        return ""
    if chosen.lr == points[0].lr:
        return "lowest lr of the grid: the best may be lower"
    if chosen.lr == points[-1].lr:
        return "highest lr of the grid: the best may be higher"
    return ""


def sort_rows(task: Task, rows: list[Row]) -> list[Row]:
    """Complete rows first, best first: by steps to target where the task leads with it, else by metric."""
    sign = -1.0 if task.higher_is_better else 1.0

    def by_metric(row: Row) -> float:
        mean = row.metric_mean
        return sign * mean if math.isfinite(mean) else math.inf

    def key(row: Row) -> tuple[float, ...]:
        done = 0.0 if row.runs else 1.0
        if task.lead == "steps_to_target":
            steps = row.steps_to_target
            unreached = 0.0 if steps is not None and row.reached == len(row.runs) else 1.0
            return (done, unreached, steps if steps is not None else math.inf, by_metric(row))
        return (done, by_metric(row))

    return sorted(rows, key=key)


def fmt_lr(lr: float | None) -> str:
    return "—" if lr is None else f"{lr:.3g}"


def fmt_metric(mean: float, std: float, count: int = 2) -> str:
    """``mean ± sd``; with one seed there is no spread to show."""
    if not math.isfinite(mean):
        return "—"
    if count < 2:
        return f"{mean:.4f} (1 seed)"
    return f"{mean:.4f} ± {std:.4f}"


def fmt_steps(row: Row) -> str:
    if not row.runs:
        return "—"
    steps = row.steps_to_target
    if steps is None:
        return f"not reached (0/{len(row.runs)})"
    text = f"{steps:g}"
    return text if row.reached == len(row.runs) else f"{text} ({row.reached}/{len(row.runs)})"


def fmt_number(value: float, digits: int = 3) -> str:
    """``digits`` significant digits, without switching to exponent notation below 10^6."""
    if not math.isfinite(value):
        return "—"
    if 10 ** digits <= abs(value) < 1e6:
        return f"{value:.0f}"
    return f"{value:.{digits}g}"
