"""Live progress in the terminal: which run, its step and loss, and the time left."""

from __future__ import annotations

import math
from typing import Any

from danlu.arena.records import RunKey, RunRecord


class Progress:
    """Silent progress: the interface, doing nothing."""

    def start(self, total_runs: int, steps: int) -> None:
        """The arena is about to train ``total_runs`` runs of ``steps`` steps (some may be reused)."""

    def add_runs(self, count: int) -> None:
        """``count`` more runs were planned than announced."""

    def run_started(self, phase: str, key: RunKey, remote: bool = False) -> None:
        """A run starts (``phase`` is "sweep" or "seeds"); ``remote``: handed to a worker, no step progress."""

    def step(self, step: int, steps: int, loss: float) -> None:
        """A training step of the current run finished."""

    def run_finished(self, phase: str, record: RunRecord, reused: bool, remote: bool = False) -> None:
        """A run finished (or was found finished in the output folder); ``remote``: trained by a worker."""

    def message(self, text: str) -> None:
        """A one-line note for the user."""

    def stop(self) -> None:
        """Tear down the display."""


def _result_text(record: RunRecord) -> str:
    metric = f"{record.val_metric:.4f}" if math.isfinite(record.val_metric) else "nan"
    state = "diverged" if record.diverged else f"val {metric}"
    return f"{record.key.label()}: {state}, {record.steps} steps, {record.wall_s:.1f}s"


class RichProgress(Progress):
    """Progress bars with rich on a terminal; one line per finished run elsewhere (logs, CI)."""

    def __init__(self, console: Any | None = None) -> None:
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.live = self.console.is_terminal
        self._bar: Any = None
        self._overall: Any = None
        self._current: Any = None
        self._steps = 1
        self._done = 0
        self._total = 0

    def start(self, total_runs: int, steps: int) -> None:
        self._steps, self._total = steps, total_runs
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as Bars

        self._bar = Bars(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeRemainingColumn(),
            console=self.console, transient=False, refresh_per_second=8,
        )
        self._bar.start()
        self._overall = self._bar.add_task("all runs (steps)", total=total_runs * steps, info="")
        self._current = self._bar.add_task("waiting", total=steps, info="")

    def add_runs(self, count: int) -> None:
        self._total += count
        if self._bar is not None:
            self._bar.update(self._overall, total=self._total * self._steps)

    def run_started(self, phase: str, key: RunKey, remote: bool = False) -> None:
        if self._bar is not None:
            from rich.markup import escape

            if remote:
                self._bar.update(self._current, description=escape(f"[{phase}] handed to a worker: {key.label()}"),
                                 info="")
                return
            self._bar.reset(self._current, total=self._steps, description=escape(f"[{phase}] {key.label()}"), info="")

    def step(self, step: int, steps: int, loss: float) -> None:
        if self._bar is not None:
            self._bar.update(self._current, completed=step, info=f"loss {loss:.4f}")
            self._bar.advance(self._overall)

    def run_finished(self, phase: str, record: RunRecord, reused: bool, remote: bool = False) -> None:
        self._done += 1
        note = " (reused from the output folder)" if reused else ""
        if self._bar is not None:
            advance = self._steps if reused or remote else self._steps - record.steps
            if advance:
                self._bar.advance(self._overall, advance)
            if reused:
                return
            self._bar.update(self._overall, info=f"{self._done}/{self._total} runs")
            return
        self.console.print(f"[{self._done}/{self._total}] {phase}: {_result_text(record)}{note}", highlight=False,
                           markup=False, soft_wrap=True)

    def message(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False, soft_wrap=True)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
