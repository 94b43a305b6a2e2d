"""danlu arena end to end on tiny budgets: digits, the Python API, resume, interruption, the report files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import danlu.arena
from danlu.arena import arena as arena_module
from danlu.arena.roster import DEFAULT_ROSTER, parse_lr_grid, parse_roster, sweep_lrs
from danlu.arena.summary import SweepPoint, choose_lr, lr_note
from danlu.arena.tasks.digits import DigitsTask

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

TINY = {"optimizers": "adamw,sgdm,adamw+ema", "steps": 25, "seeds": 2, "lr_grid": "0.3,1", "eval_every": 5}


@pytest.fixture(scope="module")
def digits_report(tmp_path_factory: pytest.TempPathFactory) -> danlu.arena.ArenaResult:
    out = tmp_path_factory.mktemp("digits")
    return danlu.arena.run_task("digits", out=out, progress=False, **TINY)


def test_digits_tiny_end_to_end(digits_report: danlu.arena.ArenaResult) -> None:
    result = digits_report
    out = result.config.out
    for name in ("report.html", "summary.md", "curves.csv", "results.json",
                 "plots/curves_vs_step.png", "plots/curves_vs_time.png", "plots/lr_sensitivity.png"):
        assert (out / name).is_file(), name
    # Every optimizer's sweep (the 2-point grid, grown at an edge), plus 1 more seed each at the chosen lr.
    assert len(result.records) == sum(len(row.sweep) for row in result.rows) + 3
    assert not result.interrupted
    assert {row.spec for row in result.rows} == {"adamw", "sgdm", "adamw+ema"}
    for row in result.rows:
        assert row.complete
        base = sweep_lrs(row.spec, (0.3, 1.0), DigitsTask.lr_scale)
        assert set(base) <= {p.lr for p in row.sweep} and len(row.sweep) <= len(base) + 2
        assert row.lr in {p.lr for p in row.sweep}
        assert len(row.runs) == 2 and {run.seed for run in row.runs} == {0, 1}
        assert 0.0 <= row.metric_mean <= 1.0
        assert row.step_time_ms > 0 and row.timing is not None
    data = json.loads((out / "results.json").read_text())
    assert {entry["optimizer"] for entry in data["summary"]} == {"adamw", "sgdm", "adamw+ema"}
    assert len(data["runs"]) == len(result.records)
    pick = result.recommendation
    assert pick is not None and pick.spec == result.rows[0].spec
    assert data["recommendation"]["optimizer"] == pick.spec and data["recommendation"]["lr"] == pick.lr
    assert data["recommendation"]["tied"] == pick.tied
    for entry in data["summary"]:
        assert {"optimizer", "chosen_lr", "metric_mean"} <= set(entry)
    assert f"Recommendation: {pick.spec} at lr {pick.lr:.3g}" in (out / "summary.md").read_text()
    with (out / "curves.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["curve"] for r in rows} == {"train", "val"}
    assert {r["optimizer"] for r in rows} == {"adamw", "sgdm", "adamw+ema"}


def test_report_html_is_self_contained(digits_report: danlu.arena.ArenaResult) -> None:
    page = (digits_report.config.out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    assert page.index('id="recommendation"') < page.index('id="results"')
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert 'id="results"' in page and 'id="sensitivity"' in page
    for spec in ("adamw", "sgdm", "adamw+ema"):
        assert f">{spec}<" in page
    markdown = (digits_report.config.out / "summary.md").read_text()
    assert "| # | optimizer | chosen lr |" in markdown


def test_optimizer_state_bytes_are_measured(digits_report: danlu.arena.ArenaResult) -> None:
    rows = {row.spec: row for row in digits_report.rows}
    # SGD with momentum keeps one buffer (4 bytes/param in float32), AdamW two, AdamW+EMA three.
    assert rows["sgdm"].state_bytes_per_param == pytest.approx(4, abs=0.1)
    assert rows["adamw"].state_bytes_per_param == pytest.approx(8, abs=0.1)
    params = rows["adamw"].runs[0].n_params
    assert params == 64 * 64 + 64 + 64 * 10 + 10
    # exact: one float32 buffer per parameter more for AdamW's second moment, and again for EMA's shadow weights
    adamw, sgdm, ema = rows["adamw"].state_bytes, rows["sgdm"].state_bytes, rows["adamw+ema"].state_bytes
    assert adamw is not None and sgdm is not None and ema is not None
    assert adamw - sgdm == 4 * params and ema - adamw == 4 * params


def test_same_seed_same_data_order_and_init() -> None:
    task = DigitsTask()
    task.prepare()
    first = [b[1].tolist() for b, _ in zip(task.batches(3), range(5), strict=False)]
    again = [b[1].tolist() for b, _ in zip(task.batches(3), range(5), strict=False)]
    other = [b[1].tolist() for b, _ in zip(task.batches(4), range(5), strict=False)]
    assert first == again and first != other
    torch.manual_seed(7)
    a = task.make_model(7)
    torch.manual_seed(7)
    b = task.make_model(7)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_resume_skips_finished_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = dict(optimizers="adam,sgdm", steps=10, seeds=2, lr_grid="1", out=tmp_path, progress=False)
    first = danlu.arena.run_task("digits", **options)
    assert len(first.records) == 4

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(arena_module, "train_run", fail)
    second = danlu.arena.run_task("digits", **options)
    assert len(second.records) == 4
    assert [r.metric_mean for r in second.rows] == [r.metric_mean for r in first.rows]


def test_changed_settings_are_not_reused(tmp_path: Path) -> None:
    danlu.arena.run_task("digits", optimizers="adam", steps=8, seeds=1, lr_grid="1", out=tmp_path, progress=False)
    again = danlu.arena.run_task("digits", optimizers="adam", steps=12, seeds=1, lr_grid="1", out=tmp_path,
                                 progress=False)
    assert again.records[0].steps == 12


def test_interrupt_keeps_finished_runs_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = arena_module.train_run
    calls = {"n": 0}

    def interrupt_on_third(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    options = dict(optimizers="adam,sgdm", steps=10, seeds=2, lr_grid="1", out=tmp_path, progress=False, workers=1)
    monkeypatch.setattr(arena_module, "train_run", interrupt_on_third)
    stopped = danlu.arena.run_task("digits", **options)
    assert stopped.interrupted
    assert len(stopped.records) == 2
    assert "Interrupted" in (tmp_path / "report.html").read_text()
    assert len(list((tmp_path / "runs").glob("*.json"))) == 2

    trained = []

    def count(*args: object, **kwargs: object) -> object:
        trained.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(arena_module, "train_run", count)
    resumed = danlu.arena.run_task("digits", **options)
    assert not resumed.interrupted
    assert len(resumed.records) == 4 and len(trained) == 2
    assert "Interrupted" not in (tmp_path / "report.html").read_text()


def test_user_model_and_data_api(tmp_path: Path) -> None:
    data = _regression_data()
    result = danlu.arena.run(lambda: torch.nn.Linear(5, 1), data, loss_fn=torch.nn.functional.mse_loss,
                             metric="loss", optimizers=["adam", "lion"], steps=40, seeds=1, lr_grid=[1, 10],
                             batch_size=20, out=tmp_path, progress=False, name="regression")
    assert (tmp_path / "report.html").is_file()
    assert not result.config.task.higher_is_better
    for row in result.rows:
        assert math.isfinite(row.metric_mean)
    assert "regression" in (tmp_path / "report.html").read_text()


def test_user_api_rejects_bad_data(tmp_path: Path) -> None:
    model_fn = lambda: torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="'val'"):
        danlu.arena.run(model_fn, {"train": (torch.zeros(4, 2), torch.zeros(4))}, out=tmp_path, progress=False)
    with pytest.raises(TypeError, match="data"):
        danlu.arena.run(model_fn, [1, 2], out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        danlu.arena.run(model_fn, {"train": (torch.zeros(4, 2), torch.zeros(4)),
                                   "val": (torch.zeros(4, 2), torch.zeros(4))}, metric="f7", out=tmp_path)
    assert not (tmp_path / "runs").exists()


def test_bad_hyperparameters_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ema_momentum"):
        danlu.arena.run_task("digits", optimizers="adamw+ema", hyperparameters={"adamw+ema": {"ema_momentum": 2.0}},
                             steps=5, seeds=1, lr_grid="1", out=tmp_path, progress=False)
    with pytest.raises(ValueError, match="lr_grid"):
        danlu.arena.run_task("digits", hyperparameters={"adam": {"lr": 0.1}}, optimizers="adam",
                             out=tmp_path, progress=False)
    assert not (tmp_path / "runs").exists()


def test_roster_and_grid_parsing() -> None:
    assert parse_roster(None) == DEFAULT_ROSTER
    assert parse_roster(" adamw , ranger ") == ("adamw", "ranger")
    with pytest.raises(ValueError, match="valid optimizers"):
        parse_roster("adamw,nope")
    with pytest.raises(ValueError, match="more than once"):
        parse_roster("adamw,AdamW")
    with pytest.raises(ValueError, match="empty"):
        parse_roster(" , ")
    assert parse_lr_grid("3,1,0.3,1") == (0.3, 1.0, 3.0)
    with pytest.raises(ValueError, match="empty"):
        parse_lr_grid("")
    with pytest.raises(ValueError, match="> 0"):
        parse_lr_grid([1, 0])
    assert sweep_lrs("adam", (0.1, 1.0, 10.0)) == (1e-4, 1e-3, 1e-2)


def test_lr_choice_and_edge_notes() -> None:
    task = DigitsTask()
    points = [SweepPoint(0.01, 0.8, 0.5, False), SweepPoint(0.1, 0.9, 0.4, False),
              SweepPoint(1.0, math.nan, math.nan, True)]
    best = choose_lr(task, points)
    assert best is not None and best.lr == 0.1 and lr_note(points, best) == ""
    ties = [SweepPoint(0.01, 0.9, 0.5, False), SweepPoint(0.1, 0.9, 0.3, False)]
    best = choose_lr(task, ties)
    assert best is not None and best.lr == 0.1 and "highest" in lr_note(ties, best)
    diverged = [SweepPoint(0.1, math.nan, math.nan, True), SweepPoint(1.0, math.nan, math.nan, True)]
    assert lr_note(diverged, choose_lr(task, diverged)) == "every lr diverged"


def _regression_data() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.1 * torch.randn(300, generator=generator)
    return {"train": (x[:200], y[:200, None]), "val": (x[200:250], y[200:250, None]), "test": (x[250:], y[250:, None])}


def test_divergence_is_recorded(tmp_path: Path) -> None:
    result = danlu.arena.run(lambda: torch.nn.Linear(5, 1), _regression_data(), loss_fn=torch.nn.functional.mse_loss,
                             metric="loss", optimizers="sgd", steps=200, seeds=1, lr_grid=[1e4], out=tmp_path,
                             progress=False)
    record = result.records[0]
    assert record.diverged and record.steps < 200
    assert result.rows[0].lr_note == "every lr diverged"
    page = (tmp_path / "report.html").read_text()
    assert "diverged" in page
    def reject(constant: str) -> None:
        raise AssertionError(f"results.json holds {constant}, which is not JSON")

    json.loads((tmp_path / "results.json").read_text(), parse_constant=reject)


def test_derivations_that_delay_steps_still_evaluate(tmp_path: Path) -> None:
    result = danlu.arena.run_task("digits", optimizers="adam+gradient_accumulation+ema,radam+piecewise_linear_lr",
                                  steps=6, seeds=1, lr_grid="1", eval_every=1, out=tmp_path, progress=False)
    assert all(math.isfinite(r.val_metric) for r in result.records)
    settings = {r.spec: r.hyperparameters for r in result.records}
    assert "ema_momentum" in settings["adam+gradient_accumulation+ema"]
    assert settings["radam+piecewise_linear_lr"]["lr_schedule"] == {"1": 1.0}
