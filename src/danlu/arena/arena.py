"""The arena: a learning-rate sweep per optimizer, then several seeds at the chosen lr.

Fairness rules, applied to every optimizer alike:

- the same model initialisation and the same batch order for a given seed;
- the same budget (steps) and evaluation schedule;
- a learning rate chosen by the same rule: a log grid around the optimizer's
  typical lr, seed 0, best final metric on the validation split;
- the final numbers are on the test split (when the task has one), over several
  seeds; the seed-0 run of the sweep at the chosen lr is one of them (it is the
  same computation).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import danlu
from danlu.arena._checks import check_optional_positive_int, check_positive_int
from danlu.arena.progress import Progress
from danlu.arena.records import RunKey, RunRecord, RunStore, fingerprint
from danlu.arena.roster import (
    check_user_hyperparameters,
    merge_hyperparameters,
    parse_lr_grid,
    parse_roster,
    sweep_lrs,
)
from danlu.arena.runner import RunPlan, log_every_for, train_run
from danlu.arena.summary import Row, choose_lr, lr_note, sort_rows, sweep_points
from danlu.arena.tasks.base import Task
from danlu.factory import create_optimizer

SWEEP_SEED = 0


@dataclass
class ArenaConfig:
    """A validated arena: what to train, with which optimizers, for how long, and where to report."""

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

    def plan(self) -> RunPlan:
        return RunPlan(steps=self.steps, eval_every=self.eval_every, log_every=log_every_for(self.steps))

    def lrs(self, spec: str) -> tuple[float, ...]:
        return sweep_lrs(spec, self.lr_grid, self.task.lr_scale)

    def settings(self, spec: str) -> dict[str, Any]:
        return merge_hyperparameters(spec, self.steps, self.hyperparameters)

    def run_fingerprint(self, spec: str) -> str:
        return fingerprint({
            "task": self.task.fingerprint(), "steps": self.steps, "eval_every": self.eval_every,
            "spec": spec, "settings": self.settings(spec), "danlu": danlu.__version__,
        })


@dataclass
class ArenaResult:
    """What the arena produced: the rows of the table, every run, and the report's files."""

    config: ArenaConfig
    rows: list[Row]
    records: list[RunRecord]
    files: dict[str, Path]
    interrupted: bool = False

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
) -> ArenaConfig:
    """Check every option (nothing is trained or written here) and return the config."""
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
        threads=n_threads, resume=bool(resume),
    )


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
    """Runs a validated config: sweep, choose, seeds; keeps every finished run on disk."""

    def __init__(self, config: ArenaConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress or Progress()
        self.store = RunStore(config.out)
        self.records: dict[RunKey, RunRecord] = {}

    def run(self) -> ArenaResult:
        """Train everything not already in the output folder and write the report.

        Ctrl-C stops training; the runs that finished are kept and reported, and
        a rerun with the same output folder resumes from them.
        """
        from danlu.arena.report import write_report

        config = self.config
        previous_threads = torch.get_num_threads()
        if config.threads:
            torch.set_num_threads(config.threads)
        interrupted = False
        try:
            sweep_total = sum(len(config.lrs(spec)) for spec in config.optimizers)
            self.progress.start(sweep_total + len(config.optimizers) * max(0, config.seeds - 1), config.steps)
            self._sweep()
            self._seeds()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            self.progress.stop()
            torch.set_num_threads(previous_threads)
        rows = self.rows()
        records = list(self.records.values())
        files = write_report(config, rows, records, interrupted=interrupted)
        return ArenaResult(config=config, rows=rows, records=records, files=files, interrupted=interrupted)

    def _sweep(self) -> None:
        for spec in self.config.optimizers:
            for lr in self.config.lrs(spec):
                self._run("sweep", RunKey(spec, lr, SWEEP_SEED))

    def _seeds(self) -> None:
        for spec in self.config.optimizers:
            chosen = self._chosen(spec)
            if chosen is None:
                continue
            for seed in range(self.config.seeds):
                self._run("seeds", RunKey(spec, chosen, seed))

    def _chosen(self, spec: str) -> float | None:
        points = sweep_points(self._sweep_records(spec))
        best = choose_lr(self.config.task, points)
        return None if best is None else best.lr

    def _sweep_records(self, spec: str) -> list[RunRecord]:
        lrs = self.config.lrs(spec)
        return [r for k, r in self.records.items() if k.spec == spec and k.seed == SWEEP_SEED and k.lr in lrs]

    def _run(self, phase: str, key: RunKey) -> RunRecord:
        if key in self.records:
            return self.records[key]
        config = self.config
        expected = config.run_fingerprint(key.spec)
        record = self.store.load(key, expected) if config.resume else None
        reused = record is not None
        if record is None:
            self.progress.run_started(phase, key)
            record = train_run(config.task, key, config.plan(), config.settings(key.spec), expected,
                               on_step=self.progress.step)
            self.store.save(record)
        self.records[key] = record
        self.progress.run_finished(phase, record, reused)
        return record

    def rows(self) -> list[Row]:
        """The table: one row per optimizer, with its sweep, chosen lr and seed runs so far."""
        rows = []
        for spec in self.config.optimizers:
            points = sweep_points(self._sweep_records(spec))
            complete_sweep = len(points) == len(self.config.lrs(spec))
            best = choose_lr(self.config.task, points) if complete_sweep else None
            row = Row(spec=spec, lr=None if best is None else best.lr, lr_note=lr_note(points, best),
                      sweep=points, seeds_planned=self.config.seeds)
            if best is not None:
                row.runs = [r for k, r in sorted(self.records.items(), key=lambda kv: kv[0].seed)
                            if k.spec == spec and k.lr == best.lr]
            rows.append(row)
        return sort_rows(self.config.task, rows)


def run_config(config: ArenaConfig, progress: Progress | None = None) -> ArenaResult:
    """Preflight (errors before training), then run the arena and write its report."""
    preflight(config)
    return Arena(config, progress).run()
