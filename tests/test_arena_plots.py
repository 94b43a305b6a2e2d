"""The report's figures: a distinct look for every series, and a zoom onto the band where the top runs end."""

from __future__ import annotations

import pytest

from danlu.arena.records import Curve, RunRecord
from danlu.arena.summary import Row

pytest.importorskip("matplotlib")

from danlu.arena.plots import intervals_figure, style_for, zoom_band


def test_every_series_looks_different_for_large_rosters() -> None:
    looks = [(s["color"], s["linestyle"], s.get("marker")) for s in (style_for(i) for i in range(160))]
    assert len(set(looks)) == 160
    # neighbours in the roster differ in colour and in line style
    assert all(looks[i][0] != looks[i + 1][0] and looks[i][1] != looks[i + 1][1] for i in range(159))


def _row(spec: str, *finals: float) -> Row:
    runs = []
    for seed, final in enumerate(finals):
        evals = Curve(step=[0, 10, 20, 30, 40, 50, 60, 70], metric=[0.1, 0.5, 0.7, 0.8, 0.9, final - 0.01, final,
                                                                      final])
        runs.append(RunRecord(spec=spec, lr=0.01, seed=seed, fingerprint="", hyperparameters={}, steps=70,
                              train=Curve(), evals=evals, val_loss=0.1, val_metric=final, test_loss=0.1,
                              test_metric=final, step_time_s=0.001, state_bytes_per_param=8.0, n_params=10,
                              diverged=False, steps_to_target=None, wall_s=0.1))
    return Row(spec=spec, lr=0.01, lr_note="", sweep=[], runs=runs, seeds_planned=len(finals))


def test_zoom_band_holds_the_top_runs_last_quarter() -> None:
    rows = [_row("a", 0.97, 0.96), _row("b", 0.95, 0.955), _row("c", 0.5, 0.52)]
    low, high = zoom_band(rows, top=2)
    # last quarter of each curve: its last 2 of 8 points, 0.95 ... 0.97; padded by 15% of that range
    assert low == pytest.approx(0.95 - 0.003) and high == pytest.approx(0.97 + 0.003)
    assert zoom_band([], top=2) is None


def test_intervals_figure_is_a_png() -> None:
    data = intervals_figure([_row("a", 0.97, 0.96), _row("b", 0.95, 0.955)], "final test accuracy",
                            {"a": 0, "b": 1}, "a", {"b"})
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
