"""The lr sweep: the grid grows at an edge, runs stuck at chance or diverged are marked and never chosen."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

import danlu.arena
from danlu.arena.arena import Arena, make_config
from danlu.arena.records import Curve, RunRecord
from danlu.arena.summary import SweepPoint, choose_lr, lr_note, sweep_points
from danlu.arena.tasks.base import Baseline
from danlu.arena.tasks.digits import DigitsTask, load_digits_splits

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def record(lr: float, metric: float, diverged: bool = False) -> RunRecord:
    return RunRecord(spec="adam", lr=lr, seed=0, fingerprint="", hyperparameters={}, steps=10, train=Curve(),
                     evals=Curve(), val_loss=1.0 - metric, val_metric=metric, test_loss=None, test_metric=None,
                     step_time_s=0.0, state_bytes_per_param=8.0, n_params=1, diverged=diverged,
                     steps_to_target=None, wall_s=0.0)


@pytest.fixture
def arena(tmp_path: Path) -> Arena:
    task = DigitsTask()
    task.prepare()  # chance on validation: 0.0944 (the most common training digit), margin 0.031
    return Arena(make_config(task, optimizers="adam", lr_grid="0.1,1,10", lr_extend=2, out=tmp_path))


def test_the_grid_grows_at_the_edge_where_the_best_sits(arena: Arena) -> None:
    # adam's typical lr 1e-3 times the task's scale 10: the grid is 0.001, 0.01, 0.1
    assert arena.sweep_lrs("adam") == (0.001, 0.01, 0.1)
    for lr, metric in ((0.001, 0.6), (0.01, 0.8), (0.1, 0.9)):
        arena.records[record(lr, metric).key] = record(lr, metric)
    assert arena.sweep_lrs("adam") == (0.001, 0.01, 0.1, 1.0)  # the next lr up, still to train
    arena.records[record(1.0, 0.95).key] = record(1.0, 0.95)
    assert arena.sweep_lrs("adam") == (0.001, 0.01, 0.1, 1.0, 10.0)
    arena.records[record(10.0, 0.97).key] = record(10.0, 0.97)
    assert arena.sweep_lrs("adam") == (0.001, 0.01, 0.1, 1.0, 10.0)  # two extra lrs at most
    (row,) = arena.rows()
    assert row.lr == 10.0
    assert row.lr_note == "grid extended by 2 higher lrs; highest lr of the grid: the best may be higher"
    assert [p.extended for p in row.sweep] == [False, False, False, True, True]


def test_the_grid_grows_downward_and_stops_when_the_best_moves_inside(arena: Arena) -> None:
    for lr, metric in ((0.001, 0.9), (0.01, 0.8), (0.1, 0.5), (0.0001, 0.95), (1e-5, 0.7)):
        arena.records[record(lr, metric).key] = record(lr, metric)
    assert arena.sweep_lrs("adam") == (1e-5, 0.0001, 0.001, 0.01, 0.1)
    (row,) = arena.rows()
    assert row.lr == 0.0001 and row.lr_note == "grid extended by 2 lower lrs"


def test_no_growth_inside_or_when_switched_off(arena: Arena, tmp_path: Path) -> None:
    for lr, metric in ((0.001, 0.8), (0.01, 0.9), (0.1, 0.5)):
        arena.records[record(lr, metric).key] = record(lr, metric)
    assert arena.sweep_lrs("adam") == (0.001, 0.01, 0.1)
    off = Arena(make_config(arena.config.task, optimizers="adam", lr_grid="0.1,1,10", lr_extend=0, out=tmp_path))
    for lr, metric in ((0.001, 0.6), (0.01, 0.8), (0.1, 0.9)):
        off.records[record(lr, metric).key] = record(lr, metric)
    assert off.sweep_lrs("adam") == (0.001, 0.01, 0.1)


def test_all_stuck_grows_upward_and_all_diverged_downward(arena: Arena, tmp_path: Path) -> None:
    for lr in (0.001, 0.01, 0.1):
        arena.records[record(lr, 0.1).key] = record(lr, 0.1)  # chance on 10 digits: too small to learn
    assert arena.sweep_lrs("adam")[-1] == 1.0
    (row,) = arena.rows()
    assert row.lr is None and all(p.stuck for p in row.sweep)
    diverging = Arena(make_config(arena.config.task, optimizers="adam", lr_grid="0.1,1,10", out=tmp_path))
    for lr in (0.001, 0.01, 0.1):
        diverging.records[record(lr, math.nan, True).key] = record(lr, math.nan, True)
    assert diverging.sweep_lrs("adam")[0] == 0.0001


def test_digits_chance_is_the_majority_class() -> None:
    splits = load_digits_splits()
    majority = Counter(splits["train"][1].tolist()).most_common(1)[0][0]
    share = Counter(splits["val"][1].tolist())[majority] / 360
    task = DigitsTask()
    task.prepare()
    baseline = task.baseline("val")
    assert baseline is not None
    assert baseline.value == pytest.approx(share, abs=1e-7)
    assert baseline.margin == pytest.approx(2 * math.sqrt(share * (1 - share) / 360), abs=1e-7)


def test_stuck_and_diverged_points_are_never_chosen() -> None:
    task = DigitsTask()
    baseline = Baseline(0.1, 0.03)
    points = sweep_points([record(0.01, 0.12), record(0.1, 0.5), record(1.0, math.nan, True)], baseline, True)
    assert [(p.stuck, p.diverged) for p in points] == [(True, False), (False, False), (False, True)]
    best = choose_lr(task, points)
    assert best is not None and best.lr == 0.1
    only_bad = [SweepPoint(0.01, 0.11, 2.3, False, stuck=True), SweepPoint(1.0, math.nan, math.nan, True)]
    assert choose_lr(task, only_bad) is None
    assert lr_note(only_bad, None) == "no lr learned anything: every lr diverged or stayed at chance"
    assert lr_note([SweepPoint(0.01, 0.9, 0.3, False)], SweepPoint(0.01, 0.9, 0.3, False)) == \
        "untuned: a single lr, no sweep"


def test_stuck_runs_are_marked_in_the_report(tmp_path: Path) -> None:
    # sgdm at 9.48 and lamb at 0.948 end at chance on digits (both known from the default sweep)
    result = danlu.arena.run_task("digits", optimizers="sgdm,lamb", steps=20, seeds=1, lr_grid="1,3.16,31.6",
                                  lr_extend=0, eval_every=5, out=tmp_path, progress=False, workers=1)
    rows = {row.spec: row for row in result.rows}
    assert [p.stuck for p in rows["sgdm"].sweep] == [False, False, True]
    assert [p.stuck for p in rows["lamb"].sweep] == [False, False, True]
    assert rows["sgdm"].lr == 0.3 and rows["lamb"].lr == 0.0948
    data = json.loads((tmp_path / "results.json").read_text())
    marked = {entry["optimizer"]: [p["stuck"] for p in entry["sweep"]] for entry in data["summary"]}
    assert marked == {"sgdm": [False, False, True], "lamb": [False, False, True]}
    page = (tmp_path / "report.html").read_text()
    assert "9.48: 0.1083 (chance)" in page and "0.948: 0.1083 (chance)" in page


def test_one_point_grid_is_reported_untuned(tmp_path: Path) -> None:
    result = danlu.arena.run_task("digits", optimizers="adam,lion", steps=10, seeds=1, lr_grid="1", out=tmp_path,
                                  progress=False, workers=1)
    assert all(row.lr_note == "untuned: a single lr, no sweep" for row in result.rows)
    text = (tmp_path / "summary.md").read_text()
    assert "no lr sweep: typical lr only (untuned)" in text
    assert "Learning rates were not tuned (a one-point grid)" in text
    assert "chosen on" not in text


def test_diverged_runs_are_marked(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    data = {"train": (x[:120], y[:120, None]), "val": (x[120:160], y[120:160, None]), "test": (x[160:], y[160:, None])}
    result = danlu.arena.run(lambda: torch.nn.Linear(5, 1), data, loss_fn=torch.nn.functional.mse_loss,
                             metric="loss", optimizers="sgd", steps=60, seeds=1, lr_grid=[1, 1e5], lr_extend=0,
                             out=tmp_path, progress=False, workers=1)
    (row,) = result.rows
    assert [p.diverged for p in row.sweep] == [False, True] and row.lr == 0.1
    assert "1e+04: diverged" in (tmp_path / "report.html").read_text()
