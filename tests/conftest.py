"""Shared fixtures: the reference trajectories and small builders."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def golden_dir() -> Path | None:
    """The reference trajectories: $DANLU_GOLDEN, else ../shared/golden beside the repository."""
    candidates = [os.environ.get("DANLU_GOLDEN"), ROOT.parent / "shared" / "golden", ROOT / "shared" / "golden"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "manifest.json").is_file():
            return Path(candidate)
    return None


def golden_cases() -> list[dict[str, Any]]:
    directory = golden_dir()
    if directory is None:
        return []
    with open(directory / "manifest.json") as f:
        return json.load(f)["cases"]


@pytest.fixture(scope="session")
def golden() -> Path:
    directory = golden_dir()
    if directory is None:
        if os.environ.get("CI"):
            pytest.fail("the reference trajectories (../shared/golden) are missing on CI")
        pytest.skip("reference trajectories not found: set DANLU_GOLDEN or place shared/golden beside the repository")
    return directory


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def pytest_sessionstart(session: pytest.Session) -> None:
    """With DANLU_REQUIRE_NATIVE=1 (CI), stop before any test when the native kernels do not load.

    Without them every optimizer falls back to the pure-PyTorch path and almost every test still passes,
    so nothing else would show that the fast path is gone.
    """
    if os.environ.get("DANLU_REQUIRE_NATIVE") != "1":
        return
    from danlu import _native

    if _native.load() is None:
        status = _native.status()
        pytest.exit(f"DANLU_REQUIRE_NATIVE=1 but the native kernels did not load: {status['error'] or status}", returncode=1)


def _log_skip(nodeid: str) -> None:
    """Append a skipped test or module to $DANLU_SKIPPED_LOG (.ci/run reruns them where every extra is installed)."""
    path = os.environ.get("DANLU_SKIPPED_LOG")
    if path:
        with open(path, "a") as log:
            log.write(nodeid + "\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _log_skip(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _log_skip(report.nodeid)
