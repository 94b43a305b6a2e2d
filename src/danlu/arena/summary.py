"""From finished runs to the numbers of the report: chosen lrs, means, spreads, ranks."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from danlu.arena.decision import Candidate, Interval, mean_interval
from danlu.arena.records import RunRecord
from danlu.arena.tasks.base import Baseline, Task


@dataclass
class SweepPoint:
    """One point of an lr-sensitivity curve: the validation metric at the end of the seed-0 run.

    ``stuck``: the run learned nothing, its metric is no better than the trivial
    predictor's (see :class:`~danlu.arena.tasks.base.Baseline`).
    """

    lr: float
    val_metric: float
    val_loss: float
    diverged: bool
    stuck: bool = False
    extended: bool = False

    @property
    def usable(self) -> bool:
        """Whether this lr may be chosen: finite, not diverged, not stuck at chance."""
        return not self.diverged and not self.stuck and math.isfinite(self.val_metric)


@dataclass
class StepTiming:
    """Time of one training step (forward, backward, optimizer step), measured apart from training."""

    median_ms: float
    spread: float  # interquartile range / median over the timing rounds
    rounds: int
    steps_per_round: int


@dataclass
class Row:
    """One optimizer's line in the results table."""

    spec: str
    lr: float | None
    lr_note: str
    sweep: list[SweepPoint]
    runs: list[RunRecord] = field(default_factory=list)
    seeds_planned: int = 0
    stuck_seeds: int = 0
    timing: StepTiming | None = None
    ema: bool = False

    @property
    def complete(self) -> bool:
        return self.lr is not None and len(self.runs) >= self.seeds_planned

    def _values(self, attribute: str) -> list[float]:
        values = [getattr(run, attribute) for run in self.runs]
        return [float(v) for v in values if v is not None and math.isfinite(v)]

    @property
    def metric_values(self) -> list[float]:
        """The final metric of each seed: on the test split where the task has one, else validation."""
        return list(self.metric_by_seed.values())

    @property
    def metric_by_seed(self) -> dict[int, float]:
        """Seed -> final metric (test split where every run has one, else validation); NaN for a diverged run."""
        test = [run.test_metric for run in self.runs]
        use_test = all(v is not None for v in test)
        values = {}
        for run in self.runs:
            value = run.test_metric if use_test else run.val_metric
            values[run.seed] = float(value) if value is not None and not run.diverged else math.nan
        return values

    @property
    def metric_interval(self) -> Interval:
        return mean_interval(self.metric_values)

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
        """The separately measured step time, else the median over the seed runs' own step times."""
        if self.timing is not None:
            return self.timing.median_ms
        values = self._values("step_time_s")
        return 1000 * statistics.median(values) if values else math.nan

    @property
    def state_bytes_per_param(self) -> float:
        values = self._values("state_bytes_per_param")
        return values[0] if values else math.nan

    @property
    def state_bytes(self) -> int | None:
        """Exact bytes of every tensor in the optimizer's state at the end of a run."""
        return self.runs[0].state_bytes if self.runs and self.runs[0].state_bytes else None

    @property
    def diverged(self) -> int:
        return sum(run.diverged for run in self.runs)

    def candidate(self) -> Candidate | None:
        """This row as an entry for the recommendation, if every seed finished."""
        if not self.complete or self.lr is None:
            return None
        return Candidate(self.spec, self.lr, self.metric_by_seed, self.steps_to_target)


def sweep_points(records: Sequence[RunRecord], baseline: Baseline | None = None, higher_is_better: bool = True,
                 base_lrs: Sequence[float] = ()) -> list[SweepPoint]:
    """The sensitivity curve of one optimizer, sorted by lr; lrs outside ``base_lrs`` are the grid's extension."""
    points = [SweepPoint(r.lr, r.val_metric, r.val_loss, r.diverged,
                         stuck=not r.diverged and baseline is not None and baseline.stuck(r.val_metric, higher_is_better),
                         extended=bool(base_lrs) and r.lr not in base_lrs)
              for r in records]
    return sorted(points, key=lambda point: point.lr)


def choose_lr(task: Task, points: Sequence[SweepPoint]) -> SweepPoint | None:
    """The best sweep point: best validation metric, ties broken by lower validation loss.

    Diverged points, points stuck at chance and non-finite ones are never chosen:
    when every point is one of them, there is no choice (None).
    """
    usable = [p for p in points if p.usable]
    if not usable:
        return None
    best = usable[0]
    for point in usable[1:]:
        tie = point.val_metric == best.val_metric
        if task.better(point.val_metric, best.val_metric) or (tie and _loss(point) < _loss(best)):
            best = point
    return best


def _loss(point: SweepPoint) -> float:
    return point.val_loss if math.isfinite(point.val_loss) else math.inf


def lr_note(points: Sequence[SweepPoint], chosen: SweepPoint | None, *, complete: bool = True) -> str:
    """How the lr was chosen, when it needs saying: untuned, an extended grid, an edge, a failed sweep."""
    if not complete:
        return "sweep not finished"
    if chosen is None:
        if points and all(p.diverged for p in points):
            return "every lr diverged"
        return "no lr learned anything: every lr diverged or stayed at chance" if points else "sweep not finished"
    if len(points) < 2:
        return "untuned: a single lr, no sweep"
    notes = []
    base = [p.lr for p in points if not p.extended]
    lower = sum(p.extended and p.lr < min(base, default=math.inf) for p in points)
    higher = sum(p.extended and p.lr > max(base, default=-math.inf) for p in points)
    if lower:
        notes.append(f"grid extended by {lower} lower lr{'s' if lower > 1 else ''}")
    if higher:
        notes.append(f"grid extended by {higher} higher lr{'s' if higher > 1 else ''}")
    if chosen.lr == points[0].lr:
        notes.append("lowest lr of the grid: the best may be lower")
    elif chosen.lr == points[-1].lr:
        notes.append("highest lr of the grid: the best may be higher")
    return "; ".join(notes)


def sort_rows(task: Task, rows: list[Row]) -> list[Row]:
    """Complete rows first, best mean primary metric first (ties: fewer steps to target)."""
    sign = -1.0 if task.higher_is_better else 1.0

    def key(row: Row) -> tuple[float, ...]:
        done = 0.0 if row.runs else 1.0
        mean = row.metric_mean
        steps = row.steps_to_target
        return (done, sign * mean if math.isfinite(mean) else math.inf, steps if steps is not None else math.inf)

    return sorted(rows, key=key)


def fmt_lr(lr: float | None) -> str:
    return "—" if lr is None else f"{lr:.3g}"


def fmt_metric(interval: Interval) -> str:
    """``mean [low, high]``; with one seed there is no interval to show."""
    if not math.isfinite(interval.mean):
        return "—"
    if interval.count < 2:
        return f"{interval.mean:.4f} (1 seed)"
    return f"{interval.mean:.4f} [{interval.low:.4f}, {interval.high:.4f}]"


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
