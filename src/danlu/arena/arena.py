"""The arena: a learning-rate sweep per optimizer, then several seeds at the chosen lr.

Fairness rules, applied to every optimizer alike:

- the same model initialisation and the same batch order for a given seed;
- the same budget (steps) and evaluation schedule;
- a learning rate chosen by the same rule: a log grid around the optimizer's
  typical lr, seed 0, best final validation metric; when the best sits at an
  edge of the grid, the grid grows in that direction (a bounded number of extra
  points) before the choice is made; runs that diverge or stay at chance are
  never chosen;
- the final numbers are on the test split (when the task has one), over several
  seeds; the seed-0 run of the sweep at the chosen lr is one of them (it is the
  same computation).

Runs are independent and seeded, so they can train in any order, in worker
processes or on a Ray cluster, with the same numbers.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import danlu
from danlu.arena._checks import check_optional_positive_int, check_positive_int
from danlu.arena.backends import (
    BACKENDS,
    Backend,
    InProcess,
    ProcessPool,
    RayBackend,
    RunJob,
    available_cores,
    check_ray,
)
from danlu.arena.decision import Recommendation, recommend
from danlu.arena.progress import Progress
from danlu.arena.records import RunKey, RunRecord, RunStore, fingerprint
from danlu.arena.roster import (
    DEFAULT_LR_EXTEND,
    check_user_hyperparameters,
    derivations,
    extend_grid,
    merge_hyperparameters,
    parse_lr_grid,
    parse_roster,
    sweep_lrs,
)
from danlu.arena.runner import RunPlan, log_every_for, train_run
from danlu.arena.summary import Row, SweepPoint, choose_lr, lr_note, sort_rows, sweep_points
from danlu.arena.tasks.base import Task
from danlu.factory import create_optimizer

SWEEP_SEED = 0


@dataclass
class ArenaConfig:
    """A validated arena: what to train, with which optimizers, for how long, where, and where to report."""

    task: Task
    optimizers: tuple[str, ...]
    steps: int
    seeds: int
    lr_grid: tuple[float, ...]
    eval_every: int
    out: Path
    hyperparameters: dict[str, dict[str, Any]] = field(default_factory=dict)
    threads: int | None = None
    resume: bool = True
    lr_extend: int = DEFAULT_LR_EXTEND
    workers: int | None = None
    backend: str = "local"
    ray_address: str | None = None

    def plan(self) -> RunPlan:
        return RunPlan(steps=self.steps, eval_every=self.eval_every, log_every=log_every_for(self.steps))

    def lrs(self, spec: str) -> tuple[float, ...]:
        """The lrs of the grid as given (before any extension)."""
        return sweep_lrs(spec, self.lr_grid, self.task.lr_scale)

    def settings(self, spec: str) -> dict[str, Any]:
        return merge_hyperparameters(spec, self.steps, self.hyperparameters)

    def run_fingerprint(self, spec: str) -> str:
        return fingerprint({
            "task": self.task.fingerprint(), "steps": self.steps, "eval_every": self.eval_every,
            "spec": spec, "settings": self.settings(spec), "danlu": danlu.__version__,
        })

    @property
    def planned_runs(self) -> int:
        """Runs before any grid extension: the sweep, and the seeds beyond seed 0."""
        return len(self.optimizers) * (len(self.lr_grid) + self.seeds - 1)

    def worker_count(self) -> int:
        """``workers`` if given, else the cores of this machine capped by the number of runs.

        Where worker processes cannot be forked (not Linux), the default is one
        process: spawned workers would need a task that pickles.
        """
        if self.workers is not None:
            return self.workers
        if not sys.platform.startswith("linux"):
            return 1
        return max(1, min(available_cores(), self.planned_runs))

    def threads_per_run(self, workers: int) -> int | None:
        """torch threads of each run: ``threads`` if given; else all cores shared among the workers."""
        if self.threads is not None:
            return self.threads
        if self.backend == "ray":
            return 1
        return None if workers == 1 else max(1, available_cores() // workers)


@dataclass
class ArenaResult:
    """What the arena produced: the rows of the table, the recommendation, every run, and the report's files."""

    config: ArenaConfig
    rows: list[Row]
    records: list[RunRecord]
    files: dict[str, Path]
    interrupted: bool = False
    recommendation: Recommendation | None = None
    failed: dict[RunKey, str] = field(default_factory=dict)
    wall_s: float = 0.0

    @property
    def chosen_lrs(self) -> dict[str, float | None]:
        return {row.spec: row.lr for row in self.rows}


def make_config(
    task: Task,
    *,
    optimizers: str | Iterable[str] | None = None,
    steps: int | None = None,
    seeds: int | None = None,
    lr_grid: str | Sequence[float] | None = None,
    eval_every: int | None = None,
    out: str | os.PathLike[str] = "danlu-arena",
    hyperparameters: Mapping[str, Mapping[str, Any]] | None = None,
    threads: int | None = None,
    resume: bool = True,
    lr_extend: int = DEFAULT_LR_EXTEND,
    workers: int | None = None,
    backend: str = "local",
    ray_address: str | None = None,
) -> ArenaConfig:
    """Check every option (nothing is trained or written here) and return the config.

    ``lr_extend``: extra lrs the sweep may add beyond an edge of the grid where the
    best lr sits (0: never). ``workers``: runs trained at once in worker processes
    (default: the cores, capped by the runs; 1: in this process). ``backend``:
    "local" or "ray" (each run a Ray task on the cluster at ``ray_address``, a
    local instance by default).
    """
    if not isinstance(task, Task):
        raise TypeError(f"task must be a danlu.arena Task, got {type(task).__name__}")
    roster = parse_roster(optimizers)
    defaults = task.defaults
    n_steps = check_positive_int("steps", defaults.steps if steps is None else steps)
    n_seeds = check_positive_int("seeds", defaults.seeds if seeds is None else seeds)
    grid = parse_lr_grid(defaults.lr_grid if lr_grid is None else lr_grid)
    every = eval_every if eval_every is not None else defaults.eval_every or max(1, n_steps // 20)
    n_every = check_positive_int("eval_every", every)
    n_threads = check_optional_positive_int("threads", threads if threads is not None else defaults.threads)
    if not isinstance(out, (str, os.PathLike)):
        raise TypeError(f"out must be a path, got {type(out).__name__}")
    return ArenaConfig(
        task=task, optimizers=roster, steps=n_steps, seeds=n_seeds, lr_grid=grid, eval_every=n_every,
        out=Path(out), hyperparameters=check_user_hyperparameters(hyperparameters, roster),
        threads=n_threads, resume=bool(resume), lr_extend=_check_extend(lr_extend),
        workers=check_optional_positive_int("workers", workers), backend=_check_backend(backend, ray_address),
        ray_address=ray_address,
    )


def _check_extend(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"lr_extend must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"lr_extend must be >= 0 (extra lrs beyond an edge of the grid), got {value}")
    return value


def _check_backend(backend: Any, ray_address: Any) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if ray_address is not None:
        if not isinstance(ray_address, str) or not ray_address.strip():
            raise ValueError(f"ray_address must be a Ray cluster address such as 'auto' or 'ray://host:10001', "
                             f"got {ray_address!r}")
        if backend != "ray":
            raise ValueError("ray_address is given but backend is 'local': add backend 'ray' (--backend ray)")
    if backend == "ray":
        check_ray(ray_address)
    return str(backend)


def check_writable(out: Path) -> None:
    """Create ``out`` if needed and prove a file can be written there; else ``ValueError`` naming it."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"out: cannot write the report to {str(out)!r}: {exc.strerror or exc}") from None


def preflight(config: ArenaConfig) -> None:
    """Everything that can fail before training: data, output folder, every optimizer's settings."""
    config.task.prepare()
    check_writable(config.out)
    torch.manual_seed(SWEEP_SEED)
    model = config.task.make_model(SWEEP_SEED)
    for spec in config.optimizers:
        for lr in config.lrs(spec):
            try:
                build_optimizer_only(config.task.optimizer_parameters(model), spec, lr, config.settings(spec))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"optimizer {spec!r} at lr={lr:g}: {exc}") from None


def build_optimizer_only(parameters: Any, spec: str, lr: float, settings: dict[str, Any]) -> None:
    """Construct (and drop) an optimizer, to surface bad settings early."""
    create_optimizer(parameters, spec, lr=lr, **settings)


class Arena:
    """Runs a validated config: sweep (grown at an edge if needed), choose, seeds; keeps every finished run on disk."""

    def __init__(self, config: ArenaConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress or Progress()
        self.store = RunStore(config.out)
        self.records: dict[RunKey, RunRecord] = {}
        self.failed: dict[RunKey, str] = {}
        self.timings: dict[str, Any] = {}
        self._val_baseline = config.task.baseline("val")

    def run(self) -> ArenaResult:
        """Train everything not already in the output folder, time each optimizer, and write the report.

        Ctrl-C stops training; the runs that finished are kept and reported, and
        a rerun with the same output folder resumes from them. A run that fails
        (an exception, a worker that dies) is reported; the others go on.
        """
        from danlu.arena.report import write_report

        config = self.config
        started = time.perf_counter()
        previous_threads = torch.get_num_threads()
        if config.threads:
            torch.set_num_threads(config.threads)
        interrupted = False
        try:
            self.progress.start(config.planned_runs, config.steps)
            self._execute()
            self.timings = self._measure_timings()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self.progress.stop()
            torch.set_num_threads(previous_threads)
        rows = self.rows()
        recommendation = recommend([c for c in (row.candidate() for row in rows) if c is not None],
                                   config.task.higher_is_better)
        records = list(self.records.values())
        result = ArenaResult(config=config, rows=rows, records=records, files={}, interrupted=interrupted,
                             recommendation=recommendation, failed=dict(self.failed),
                             wall_s=time.perf_counter() - started)
        result.files = write_report(result)
        return result

    # -- scheduling -------------------------------------------------------------------------------------------

    def _backend(self) -> Backend:
        config = self.config
        workers = config.worker_count()
        threads = config.threads_per_run(workers)
        if config.backend == "local" and workers == 1:
            return InProcess(self._train_here)
        job = RunJob(task=config.task, plan=config.plan(),
                     settings={spec: config.settings(spec) for spec in config.optimizers},
                     fingerprints={spec: config.run_fingerprint(spec) for spec in config.optimizers},
                     threads=threads or 1, train=train_run)
        if config.backend == "ray":
            return RayBackend(job, config.ray_address)
        return ProcessPool(job, workers)

    def _train_here(self, phase: str, key: RunKey) -> RunRecord:
        config = self.config
        self.progress.run_started(phase, key)
        return train_run(config.task, key, config.plan(), config.settings(key.spec), config.run_fingerprint(key.spec),
                         on_step=self.progress.step)

    def _execute(self) -> None:
        """Submit every run that can be decided now; as each finishes, submit what it makes decidable."""
        backend = self._backend()
        pending: dict[Future[RunRecord], tuple[str, RunKey]] = {}
        cancel = True
        try:
            self._submit_ready(backend, pending)
            while pending:
                for future in backend.wait(pending.keys()):
                    phase, key = pending.pop(future)
                    self._collect(phase, key, future)
                self._submit_ready(backend, pending)
            cancel = False
        finally:
            backend.close(cancel=cancel)

    def _submit_ready(self, backend: Backend, pending: dict[Future[RunRecord], tuple[str, RunKey]]) -> None:
        in_flight = {key for _, key in pending.values()}
        reused = True
        while reused:
            reused = False
            for phase, key in self._wanted():
                if key in self.records or key in self.failed or key in in_flight:
                    continue
                if phase == "sweep" and key.lr not in self.config.lrs(key.spec):
                    self.progress.add_runs(1)
                record = self._reusable(key)
                if record is not None:
                    self._accept(phase, record, reused=True, remote=False)
                    reused = True
                    continue
                if backend.remote:
                    self.progress.run_started(phase, key, remote=True)
                pending[backend.submit(phase, key)] = (phase, key)
                in_flight.add(key)

    def _collect(self, phase: str, key: RunKey, future: Future[RunRecord]) -> None:
        error = future.exception()
        if error is None:
            record = future.result()
            self.store.save(record)
            self._accept(phase, record, reused=False, remote=self._remote())
            return
        if isinstance(error, KeyboardInterrupt):
            raise error
        self.failed[key] = f"{type(error).__name__}: {error}".strip()
        self.progress.message(f"run failed: {key.label()}: {self.failed[key]}")

    def _remote(self) -> bool:
        return not (self.config.backend == "local" and self.config.worker_count() == 1)

    def _reusable(self, key: RunKey) -> RunRecord | None:
        return self.store.load(key, self.config.run_fingerprint(key.spec)) if self.config.resume else None

    def _accept(self, phase: str, record: RunRecord, *, reused: bool, remote: bool) -> None:
        self.records[record.key] = record
        self.progress.run_finished(phase, record, reused, remote=remote)

    def _wanted(self) -> Iterator[tuple[str, RunKey]]:
        """Every run the results so far call for: missing sweep points (the extension too), then seeds."""
        for spec in self.config.optimizers:
            lrs = self.sweep_lrs(spec)
            missing = [lr for lr in lrs if RunKey(spec, lr, SWEEP_SEED) not in self.records]
            if missing:
                yield from (("sweep", RunKey(spec, lr, SWEEP_SEED)) for lr in missing)
                continue
            chosen = choose_lr(self.config.task, self._points(spec, lrs))
            if chosen is not None:
                yield from (("seeds", RunKey(spec, chosen.lr, seed)) for seed in range(self.config.seeds))

    # -- the lr grid --------------------------------------------------------------------------------------------

    def sweep_lrs(self, spec: str) -> tuple[float, ...]:
        """The lrs of ``spec``'s sweep so far: the grid, grown by one lr at a time at an edge.

        The grid grows where the best lr sits at an edge; when no lr is usable, it
        grows upward if every lr stayed at chance (too small to learn anything) and
        downward if every lr diverged. Growth stops at ``lr_extend`` extra lrs per
        edge, when the best moves inside, or at the first lr not trained yet (the
        caller trains it first).
        """
        config = self.config
        grid, below, above = config.lr_grid, 0, 0
        while True:
            lrs = sweep_lrs(spec, extend_grid(grid, below, above), config.task.lr_scale)
            if any(RunKey(spec, lr, SWEEP_SEED) not in self.records for lr in lrs) or len(grid) < 2:
                return lrs
            direction = _extension(config.task, self._points(spec, lrs))
            if direction < 0 and below < config.lr_extend:
                below += 1
            elif direction > 0 and above < config.lr_extend:
                above += 1
            else:
                return lrs

    def _points(self, spec: str, lrs: Sequence[float]) -> list[SweepPoint]:
        records = [self.records[RunKey(spec, lr, SWEEP_SEED)] for lr in lrs
                   if RunKey(spec, lr, SWEEP_SEED) in self.records]
        return sweep_points(records, self._val_baseline, self.config.task.higher_is_better, self.config.lrs(spec))

    # -- results ------------------------------------------------------------------------------------------------

    def _measure_timings(self) -> dict[str, Any]:
        from danlu.arena.timing import measure_step_times

        picks = []
        for spec in self.config.optimizers:
            lrs = self.sweep_lrs(spec)
            chosen = choose_lr(self.config.task, self._points(spec, lrs))
            if chosen is not None:
                picks.append((spec, chosen.lr, self.config.settings(spec)))
        return dict(measure_step_times(self.config.task, picks, self.config.threads or 1))

    def rows(self) -> list[Row]:
        """The table: one row per optimizer, with its sweep, chosen lr and seed runs so far."""
        config = self.config
        test_baseline = config.task.baseline("test" if config.task.has_split("test") else "val")
        rows = []
        for spec in config.optimizers:
            lrs = self.sweep_lrs(spec)
            points = self._points(spec, lrs)
            complete = len(points) == len(lrs)
            best = choose_lr(config.task, points) if complete else None
            row = Row(spec=spec, lr=None if best is None else best.lr,
                      lr_note=lr_note(points, best, complete=complete), sweep=points, seeds_planned=config.seeds,
                      timing=self.timings.get(spec), ema="ema" in derivations(spec))
            if best is not None:
                row.runs = [self.records[RunKey(spec, best.lr, seed)] for seed in range(config.seeds)
                            if RunKey(spec, best.lr, seed) in self.records]
                row.stuck_seeds = sum(test_baseline is not None and not run.diverged and test_baseline.stuck(
                    _final_metric(run), config.task.higher_is_better) for run in row.runs)
            rows.append(row)
        return sort_rows(config.task, rows)


def _extension(task: Task, points: Sequence[SweepPoint]) -> int:
    """Where the sweep should grow: -1 (lower lrs), +1 (higher lrs) or 0 (it is done)."""
    best = choose_lr(task, points)
    if best is None:
        if all(p.stuck for p in points):
            return 1
        return -1 if all(p.diverged for p in points) else 0
    if best.lr == points[0].lr:
        return -1
    return 1 if best.lr == points[-1].lr else 0


def _final_metric(run: RunRecord) -> float:
    return run.test_metric if run.test_metric is not None else run.val_metric


def run_config(config: ArenaConfig, progress: Progress | None = None) -> ArenaResult:
    """Preflight (errors before training), then run the arena and write its report."""
    preflight(config)
    return Arena(config, progress).run()
