"""Where runs are trained: in this process, in a pool of worker processes, or as Ray tasks.

Every run is a pure function of its task, optimizer spec, lr, seed and settings
(seeded initialisation, seeded batch order, a fixed number of CPU threads), so
its numbers do not depend on where or next to what it runs. The arena hands a
backend one run key at a time and takes the finished records back as they come.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Collection
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch

from danlu.arena.records import RunKey, RunRecord
from danlu.arena.runner import RunPlan
from danlu.arena.tasks.base import Task

BACKENDS = ("local", "ray")

#: ``train_run``'s signature: task, key, plan, settings, fingerprint -> record.
TrainFn = Callable[..., RunRecord]


def available_cores() -> int:
    """CPU cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@dataclass
class RunJob:
    """Everything a worker needs to train any run of the arena, sent once per worker."""

    task: Task
    plan: RunPlan
    settings: dict[str, dict[str, Any]]
    fingerprints: dict[str, str]
    threads: int
    train: TrainFn

    def run(self, key: RunKey) -> RunRecord:
        return self.train(self.task, key, self.plan, self.settings[key.spec], self.fingerprints[key.spec])


class Backend:
    """Trains runs and hands them back; ``remote`` backends give no per-step progress."""

    remote = True

    def submit(self, phase: str, key: RunKey) -> Future[RunRecord]:
        """Start (or queue) the run ``key``; ``phase`` ("sweep" or "seeds") is for progress only."""
        raise NotImplementedError

    def wait(self, futures: Collection[Future[RunRecord]]) -> set[Future[RunRecord]]:
        """Block until at least one of ``futures`` is done; return the done ones."""
        done, _ = wait(futures, return_when=FIRST_COMPLETED)
        return set(done)

    def close(self, cancel: bool = False) -> None:
        """Release the workers; with ``cancel`` drop what has not finished."""


class InProcess(Backend):
    """One run at a time in this process, in submission order, each trained when the arena waits for it."""

    remote = False

    def __init__(self, run: Callable[[str, RunKey], RunRecord]) -> None:
        self._run = run
        self._queue: deque[tuple[Future[RunRecord], str, RunKey]] = deque()

    def submit(self, phase: str, key: RunKey) -> Future[RunRecord]:
        future: Future[RunRecord] = Future()
        self._queue.append((future, phase, key))
        return future

    def wait(self, futures: Collection[Future[RunRecord]]) -> set[Future[RunRecord]]:
        done = {f for f in futures if f.done()}
        if done or not self._queue:
            return done
        future, phase, key = self._queue.popleft()
        try:
            future.set_result(self._run(phase, key))
        except Exception as exc:  # a failed run is reported, the others go on
            future.set_exception(exc)
        return {future}

    def close(self, cancel: bool = False) -> None:
        self._queue.clear()


#: The job of this worker process, set once when the process starts.
_WORKER: dict[str, RunJob] = {}


def _start_worker(job: RunJob) -> None:
    _WORKER["job"] = job
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    torch.set_num_threads(job.threads)


def _run_in_worker(key: RunKey) -> RunRecord:
    return _WORKER["job"].run(key)


def _start_method() -> str:
    """fork where it is safe (Linux): the prepared task reaches the workers without pickling."""
    return "fork" if sys.platform.startswith("linux") else "spawn"


class ProcessPool(Backend):
    """``workers`` processes on this machine, each with ``job.threads`` torch threads."""

    def __init__(self, job: RunJob, workers: int) -> None:
        context = multiprocessing.get_context(_start_method())
        self._executor = ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_start_worker,
                                             initargs=(job,))

    def submit(self, phase: str, key: RunKey) -> Future[RunRecord]:
        try:
            return self._executor.submit(_run_in_worker, key)
        except RuntimeError as exc:  # a broken pool: every later run fails the same way
            future: Future[RunRecord] = Future()
            future.set_exception(exc)
            return future

    def close(self, cancel: bool = False) -> None:
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        self._executor.shutdown(wait=not cancel, cancel_futures=cancel)
        if cancel:  # runs in flight are dropped: their workers are stopped, not waited for
            for process in processes:
                process.terminate()
            for process in processes:
                process.join(timeout=10)


def _run_on_ray(job: RunJob, key: RunKey) -> RunRecord:
    torch.set_num_threads(job.threads)
    return job.run(key)


class RayBackend(Backend):
    """Each run is a Ray task (one CPU) on the cluster ``ray.init(address=...)`` joins; a local one by default."""

    def __init__(self, job: RunJob, address: str | None) -> None:
        import ray

        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        self._job = ray.put(job)
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_run_on_ray)
        self._refs: list[Any] = []

    def submit(self, phase: str, key: RunKey) -> Future[RunRecord]:
        ref = self._remote.remote(self._job, key)
        self._refs.append(ref)
        future: Future[RunRecord] = ref.future()
        return future

    def close(self, cancel: bool = False) -> None:
        if cancel:
            for ref in self._refs:
                with contextlib.suppress(Exception):  # a finished task cannot be cancelled: nothing to do
                    self._ray.cancel(ref, force=True)
        if self._started:
            self._ray.shutdown()


def check_ray(address: str | None) -> None:
    """Ray is importable (the ``danlu[ray]`` extra); else an ImportError that says how to get it."""
    try:
        import ray  # noqa: F401
    except ImportError:
        where = f" (to join {address})" if address else ""
        raise ImportError(f"backend 'ray' needs Ray{where}: pip install 'danlu[ray]'") from None
