"""Runs in worker processes and on Ray give the numbers of one process; a failed run is reported, the rest kept."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import danlu.arena
from danlu.arena.arena import ArenaResult
from danlu.cli.main import EXIT_FAILED, main

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

TINY = {"optimizers": "adamw,sgdm,lion", "steps": 15, "seeds": 2, "lr_grid": "0.3,1", "eval_every": 5,
        "progress": False}


def numbers(result: ArenaResult) -> dict[Any, Any]:
    """Everything a run computes except its clocks."""
    return {record.key: (record.val_loss, record.val_metric, record.test_loss, record.test_metric, record.steps,
                         record.train.step, record.train.loss, record.evals.loss, record.evals.metric,
                         record.steps_to_target, record.state_bytes)
            for record in result.records}


def decisions(result: ArenaResult) -> tuple[Any, ...]:
    pick = result.recommendation
    assert pick is not None
    return (result.chosen_lrs, [row.spec for row in result.rows], [row.metric_values for row in result.rows],
            pick.spec, pick.lr, pick.tied)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> ArenaResult:
    return danlu.arena.run_task("digits", out=tmp_path_factory.mktemp("w1"), workers=1, **TINY)


def test_two_workers_equal_one_number_for_number(one_process: ArenaResult, tmp_path: Path) -> None:
    two = danlu.arena.run_task("digits", out=tmp_path, workers=2, **TINY)
    assert len(two.records) == len(one_process.records) >= 3 * (2 + 1)
    assert numbers(two) == numbers(one_process)
    assert decisions(two) == decisions(one_process)
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    assert meta["workers"] == 2


def test_cli_workers_two(one_process: ArenaResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["arena", "--optimizers", "adamw,sgdm,lion", "--steps", "15", "--seeds", "2", "--lr-grid", "0.3,1",
            "--eval-every", "5", "--workers", "2", "--out", str(tmp_path), "--quiet"]
    assert main(args) == 0
    data = json.loads((tmp_path / "results.json").read_text())
    pick = one_process.recommendation
    assert pick is not None
    assert data["recommendation"]["optimizer"] == pick.spec and data["recommendation"]["tied"] == pick.tied
    assert {e["optimizer"]: e["chosen_lr"] for e in data["summary"]} == one_process.chosen_lrs
    assert f"Recommendation: {pick.spec} at lr {pick.lr:.3g}" in capsys.readouterr().out


def test_ray_local_equals_local(one_process: ArenaResult, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = danlu.arena.run_task("digits", out=tmp_path, backend="ray", **TINY)
    finally:
        ray.shutdown()
    assert not on_ray.failed
    assert numbers(on_ray) == numbers(one_process)
    assert decisions(on_ray) == decisions(one_process)


def _data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(240, 4, generator=generator)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return {"train": (x[:160], y[:160]), "val": (x[160:200], y[160:200]), "test": (x[200:], y[200:])}


def _fails_on_seed_one() -> torch.nn.Module:
    if torch.initial_seed() == 1:
        raise RuntimeError("out of luck on seed 1")
    return torch.nn.Linear(4, 2)


def test_a_failed_run_is_reported_and_the_rest_kept(tmp_path: Path) -> None:
    options = dict(optimizers="adam,nadam", steps=10, seeds=2, lr_grid=[30], batch_size=16, out=tmp_path,
                   progress=False, workers=2)
    broken = danlu.arena.run(_fails_on_seed_one, _data(), **options)  # type: ignore[arg-type]
    assert {(key.spec, key.seed) for key in broken.failed} == {("adam", 1), ("nadam", 1)}
    assert all(message == "RuntimeError: out of luck on seed 1" for message in broken.failed.values())
    assert len(broken.records) == 2 and len(list((tmp_path / "runs").glob("*.json"))) == 2
    assert all(not row.complete for row in broken.rows)
    page = (tmp_path / "report.html").read_text()
    assert "2 run(s) failed and were not kept" in page and "out of luck on seed 1" in page
    fixed = danlu.arena.run(lambda: torch.nn.Linear(4, 2), _data(), **options)  # type: ignore[arg-type]
    assert not fixed.failed and len(fixed.records) == 4 and all(row.complete for row in fixed.rows)
    assert {r.key: r.test_metric for r in fixed.records if r.seed == 0} == \
        {r.key: r.test_metric for r in broken.records}


def test_cli_exit_status_when_a_run_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from danlu.arena import arena as arena_module

    real = arena_module.train_run

    def fail_lion(task: Any, key: Any, *args: Any, **kwargs: Any) -> Any:
        if key.spec == "lion":
            raise RuntimeError("lion broke")
        return real(task, key, *args, **kwargs)

    monkeypatch.setattr(arena_module, "train_run", fail_lion)
    status = main(["arena", "--optimizers", "adam,lion", "--steps", "5", "--seeds", "1", "--lr-grid", "1",
                   "--workers", "2", "--out", str(tmp_path), "--quiet"])
    assert status == EXIT_FAILED
    assert "1 run(s) failed" in capsys.readouterr().err
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["recommendation"]["optimizer"] == "adam" and data["meta"]["failed"] == {
        "lion lr=0.001 seed=0": "RuntimeError: lion broke"}


def test_interrupt_in_a_worker_keeps_finished_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from danlu.arena import arena as arena_module

    real = arena_module.train_run

    def interrupt_lion(task: Any, key: Any, *args: Any, **kwargs: Any) -> Any:
        if key.spec == "lion":  # once adam's run is on disk, as if Ctrl-C came then
            deadline = time.monotonic() + 120
            while not list((tmp_path / "runs").glob("adam__*.json")) and time.monotonic() < deadline:
                time.sleep(0.05)
            raise KeyboardInterrupt
        return real(task, key, *args, **kwargs)

    options = dict(optimizers="adam,lion", steps=5, seeds=1, lr_grid="1", out=tmp_path, progress=False)
    monkeypatch.setattr(arena_module, "train_run", interrupt_lion)
    stopped = danlu.arena.run_task("digits", workers=2, **options)
    assert stopped.interrupted and not stopped.failed
    assert [r.spec for r in stopped.records] == ["adam"]
    assert "Interrupted" in (tmp_path / "report.html").read_text()
    monkeypatch.setattr(arena_module, "train_run", real)
    resumed = danlu.arena.run_task("digits", workers=2, **options)
    assert not resumed.interrupted and sorted(r.spec for r in resumed.records) == ["adam", "lion"]
