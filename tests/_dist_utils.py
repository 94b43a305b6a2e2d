"""Run a distributed job: N gloo processes on 127.0.0.1, one spawn for many cases.

``run_job(script, out_dir)`` starts ``python script RANK WORLD STORE OUT`` once per rank (a file
store for the rendezvous: no port to pick), waits, and returns the JSON that rank 0 wrote to
``OUT/results.json``. Every case of the job runs inside that one spawn, so that the cost of
starting Python, importing torch and forming the process group (about 10 to 20 seconds on a
shared CI machine) is paid once per test module, not once per case.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _loopback_interface() -> str | None:
    try:
        names = [name for _, name in socket.if_nameindex()]
    except (OSError, AttributeError):
        return None
    for candidate in ("lo", "lo0"):
        if candidate in names:
            return candidate
    return None


def worker_env() -> dict[str, str]:
    """The environment of a worker: one thread each (2 shared cores), gloo on the loopback interface."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["MASTER_ADDR"] = "127.0.0.1"
    loopback = _loopback_interface()
    if loopback and "GLOO_SOCKET_IFNAME" not in env:
        env["GLOO_SOCKET_IFNAME"] = loopback
    src = str(ROOT / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, str(ROOT / "tests"), env.get("PYTHONPATH")) if p)
    return env


def run_job(script: Path, out_dir: Path, world_size: int = 2, timeout: float = 300.0) -> dict[str, Any]:
    """Run ``script`` on ``world_size`` processes; return rank 0's results (raise with the logs if it fails)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="danlu-store-")) / "store"
    env = worker_env()
    logs = [out_dir / f"rank{rank}.log" for rank in range(world_size)]
    procs = []
    start = time.monotonic()
    for rank in range(world_size):
        with open(logs[rank], "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), str(rank), str(world_size), str(store), str(out_dir)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=str(ROOT),
                )
            )
    try:
        for proc in procs:
            remaining = max(1.0, timeout - (time.monotonic() - start))
            proc.wait(timeout=remaining)
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        raise RuntimeError(f"distributed job {script.name} timed out after {timeout:.0f}s:\n{_tails(logs)}") from None
    codes = [proc.returncode for proc in procs]
    results_file = out_dir / "results.json"
    if any(codes) or not results_file.is_file():
        raise RuntimeError(f"distributed job {script.name} failed (exit codes {codes}):\n{_tails(logs)}")
    with open(results_file) as f:
        results = json.load(f)
    results["_wall_seconds"] = time.monotonic() - start
    return results


def _tails(logs: list[Path], chars: int = 4000) -> str:
    parts = []
    for log in logs:
        text = log.read_text(errors="replace") if log.is_file() else "(no log)"
        parts.append(f"--- {log.name} ---\n{text[-chars:]}")
    return "\n".join(parts)
