"""The recommendation's statistics on constructed results: a clear winner, a tie, too few seeds."""

from __future__ import annotations

import math

import pytest

from danlu.arena.decision import Candidate, mean_interval, recommend, t_quantile


def candidate(spec: str, *values: float, steps: float | None = None) -> Candidate:
    return Candidate(spec, 0.01, dict(enumerate(values)), steps)


def test_t_quantiles() -> None:
    assert t_quantile(1) == 12.706 and t_quantile(2) == 4.303 and t_quantile(30) == 2.042
    assert t_quantile(60) == pytest.approx(2.0003, abs=2e-4)  # tables: 2.000
    assert t_quantile(120) == pytest.approx(1.9799, abs=2e-4)  # tables: 1.980
    with pytest.raises(ValueError, match="df must be >= 1"):
        t_quantile(0)
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 17, 30, 31, 45, 200):
        assert t_quantile(df) == pytest.approx(float(stats.t.ppf(0.975, df)), abs=1e-3)


def test_mean_interval_by_hand() -> None:
    # values 1, 2, 3: mean 2, sd 1, half width 4.303 / sqrt(3)
    interval = mean_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0 and interval.count == 3
    assert interval.low == pytest.approx(2 - 2.484338, abs=1e-6)
    assert interval.high == pytest.approx(2 + 2.484338, abs=1e-6)
    single = mean_interval([0.5])
    assert single.mean == 0.5 and math.isnan(single.low) and math.isnan(single.high)


def test_clear_winner() -> None:
    pick = recommend([candidate("b", 0.90, 0.915, 0.92), candidate("a", 0.95, 0.96, 0.97)], higher_is_better=True)
    assert (pick.spec, pick.lr, pick.tied, pick.verdict, pick.seeds) == ("a", 0.01, [], "separated", 3)
    (comparison,) = pick.comparisons
    # per-seed differences 0.05, 0.045, 0.05: mean 0.048333, sd 0.0028868, half width 4.303 * sd / sqrt(3)
    assert comparison.spec == "b" and not comparison.tied
    assert comparison.difference.mean == pytest.approx(0.0483333, abs=1e-6)
    assert comparison.difference.low == pytest.approx(0.0411616, abs=1e-6)
    assert comparison.difference.high == pytest.approx(0.0555050, abs=1e-6)


def test_tie_and_a_separated_loser() -> None:
    results = [candidate("a", 0.95, 0.96, 0.97), candidate("c", 0.96, 0.95, 0.965), candidate("b", 0.90, 0.915, 0.92)]
    pick = recommend(results, higher_is_better=True)
    # a's mean 0.96 beats c's 0.95833; differences -0.01, 0.01, 0.005 give an interval around 0
    assert pick.spec == "a" and pick.tied == ["c"] and pick.verdict == "separated"
    tie = next(c for c in pick.comparisons if c.spec == "c")
    assert tie.difference.low < 0 < tie.difference.high


def test_too_few_seeds() -> None:
    one = recommend([candidate("a", 0.97), candidate("b", 0.90), candidate("c", 0.5)], higher_is_better=True)
    assert one.spec == "a" and one.tied == ["b", "c"] and one.verdict == "one seed"
    # two seeds: the 95% t quantile is 12.7, so a steady 0.02 gap with a 0.01 wobble is not resolved
    two = recommend([candidate("a", 0.96, 0.95), candidate("b", 0.93, 0.94)], higher_is_better=True)
    assert two.spec == "a" and two.tied == ["b"] and two.verdict == "all tied"


def test_lower_is_better_and_unfinished_runs() -> None:
    results = [candidate("a", 0.30, 0.31, 0.29), candidate("b", 0.20, 0.21, 0.22), candidate("x", math.nan, 0.1, 0.1)]
    pick = recommend(results, higher_is_better=False)
    assert pick.spec == "b" and [c.spec for c in pick.comparisons] == ["a"]  # a diverged seed takes x out
    assert pick.comparisons[0].difference.mean == pytest.approx(0.09, abs=1e-12)
    assert recommend([candidate("x", math.nan)], higher_is_better=True).verdict == "none"


def test_equal_means_go_to_fewer_steps_to_target() -> None:
    pick = recommend([candidate("slow", 0.9, 0.9, steps=80), candidate("fast", 0.9, 0.9, steps=40)], True)
    assert pick.spec == "fast" and pick.tied == ["slow"]
