"""The recommendation: which optimizer at which lr, and which others the seeds cannot tell apart from it.

Every optimizer trains seed ``s`` from the same initialisation on the same
batches, so results are compared seed by seed (paired): the difference of the
primary metric between the pick and another optimizer is computed per seed, and
a two-sided Student-t interval at 95% over the seeds is put around its mean. An
optimizer whose interval contains zero is *tied* with the pick.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

CONFIDENCE = 0.95
TEST_NAME = "paired t-test over seeds"

#: Two-sided 95% quantiles of Student's t (0.975 one-sided) for 1 to 30 degrees of freedom.
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
          2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
          2.045, 2.042)
_Z_975 = 1.959964


def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(_T_975):
        return _T_975[df - 1]
    z = _Z_975  # Cornish-Fisher expansion: within 1e-4 of the exact value beyond 30 degrees of freedom
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% interval; with one value there is no interval (``low``, ``high`` are NaN)."""

    mean: float
    low: float
    high: float
    count: int

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def mean_interval(values: Sequence[float]) -> Interval:
    """Mean of ``values`` with a Student-t 95% interval."""
    count = len(values)
    if count == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(values)
    if count == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = t_quantile(count - 1) * statistics.stdev(values) / math.sqrt(count)
    return Interval(mean, mean - half, mean + half, count)


@dataclass(frozen=True)
class Comparison:
    """The pick against one other optimizer, seed by seed; ``difference`` > 0 means the pick is better."""

    spec: str
    difference: Interval

    @property
    def tied(self) -> bool:
        """Not told apart from the pick: fewer than two shared seeds, or an interval that contains 0."""
        return self.difference.count < 2 or self.difference.contains(0.0)


@dataclass(frozen=True)
class Candidate:
    """What the recommendation needs of one optimizer: its chosen lr and its metric per seed."""

    spec: str
    lr: float
    by_seed: Mapping[int, float]
    steps_to_target: float | None = None


@dataclass
class Recommendation:
    """The pick, the optimizers tied with it, and what the seeds could and could not resolve."""

    spec: str | None
    lr: float | None
    metric: Interval | None
    tied: list[str] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    seeds: int = 0

    @property
    def verdict(self) -> str:
        """"none" (nothing finished), "one seed", "all tied" (seeds too few to separate anything) or "separated"."""
        if self.spec is None:
            return "none"
        if self.seeds < 2:
            return "one seed"
        if self.comparisons and all(c.tied for c in self.comparisons):
            return "all tied"
        return "separated"


def recommend(candidates: Sequence[Candidate], higher_is_better: bool) -> Recommendation:
    """The best mean metric wins (ties: fewer steps to target, then roster order); the rest are compared to it."""
    usable = [c for c in candidates if c.by_seed and all(math.isfinite(v) for v in c.by_seed.values())]
    if not usable:
        return Recommendation(spec=None, lr=None, metric=None)
    sign = 1.0 if higher_is_better else -1.0

    def rank(item: tuple[int, Candidate]) -> tuple[float, float, int]:
        index, candidate = item
        steps = candidate.steps_to_target if candidate.steps_to_target is not None else math.inf
        return (-sign * statistics.fmean(candidate.by_seed.values()), steps, index)

    pick = min(enumerate(usable), key=rank)[1]
    comparisons = [compare(pick, other, higher_is_better) for other in usable if other is not pick]
    return Recommendation(
        spec=pick.spec, lr=pick.lr, metric=mean_interval(list(pick.by_seed.values())),
        tied=[c.spec for c in comparisons if c.tied], comparisons=comparisons, seeds=len(pick.by_seed),
    )


def compare(pick: Candidate, other: Candidate, higher_is_better: bool) -> Comparison:
    """Per-seed differences (pick minus other, sign turned so that > 0 favours the pick) over shared seeds."""
    sign = 1.0 if higher_is_better else -1.0
    shared = sorted(set(pick.by_seed) & set(other.by_seed))
    differences = [sign * (pick.by_seed[s] - other.by_seed[s]) for s in shared]
    return Comparison(spec=other.spec, difference=mean_interval(differences))
