"""The roster: which optimizers compete, at which learning rates, with which settings."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from danlu.factory import parse_spec

#: The default roster: the optimizers people argue about, as ``create_optimizer`` specs.
DEFAULT_ROSTER: tuple[str, ...] = (
    "sgdm",
    "adam",
    "adamw",
    "nadam",
    "radam",
    "ranger",
    "adamw+lookahead",
    "lamb",
    "adafactor",
    "lion",
    "adamw+ema",
)

#: Centre of each base optimizer's learning-rate sweep: the value people usually start from.
TYPICAL_LR: dict[str, float] = {
    "sgd": 0.1,
    "sgdm": 0.03,
    "nag": 0.03,
    "adagrad": 0.03,
    "adadelta": 1.0,
    "rmsprop": 1e-3,
    "adam": 1e-3,
    "adamw": 1e-3,
    "nadam": 2e-3,
    "radam": 1e-3,
    "adafactor": 1e-2,
    "lion": 1e-4,
    "lamb": 3e-3,
    "lazyadam": 1e-3,
    "ranger": 1e-3,
}

#: The default sweep: half-decade steps around each optimizer's typical lr.
DEFAULT_LR_GRID: tuple[float, ...] = (0.1, 0.316, 1.0, 3.16, 10.0)


def parse_roster(optimizers: str | Iterable[str] | None) -> tuple[str, ...]:
    """Split and validate a roster: a comma-separated string or a sequence of specs.

    Every spec is checked with ``danlu.factory.parse_spec``; an unknown name is a
    ``ValueError`` that lists the valid ones.
    """
    if optimizers is None:
        return DEFAULT_ROSTER
    if isinstance(optimizers, str):
        items = [item.strip() for item in optimizers.split(",")]
    else:
        items = list(optimizers)
        if not all(isinstance(item, str) for item in items):
            raise TypeError(f"optimizers must be strings (create_optimizer specs), got {items!r}")
        items = [item.strip() for item in items]
    items = [item for item in items if item]
    if not items:
        raise ValueError("optimizers is empty: give at least one spec, e.g. 'adamw,ranger,lamb'")
    seen: dict[tuple[str, tuple[str, ...]], str] = {}
    for item in items:
        try:
            base, names = parse_spec(item)
        except ValueError as exc:
            raise ValueError(f"optimizers: {exc}") from None
        normal = (base.lower(), tuple(names))
        if normal in seen:
            raise ValueError(f"optimizers lists {item!r} more than once (as {seen[normal]!r} too)")
        seen[normal] = item
    return tuple(items)


def base_name(spec: str) -> str:
    """The base optimizer of a spec, lower case ("AdamW+ema" -> "adamw", "torch.SGD" -> "sgd")."""
    base = parse_spec(spec)[0].lower()
    return base[len("torch."):] if base.startswith("torch.") else base


def derivations(spec: str) -> tuple[str, ...]:
    """The derivations of a spec, innermost first, aliases resolved."""
    return tuple(parse_spec(spec)[1])


def typical_lr(spec: str) -> float:
    """The centre of ``spec``'s learning-rate sweep."""
    return TYPICAL_LR.get(base_name(spec), 1e-3)


def parse_lr_grid(lr_grid: str | Sequence[float] | None) -> tuple[float, ...]:
    """Validate the sweep's multipliers of each optimizer's typical lr (sorted, unique)."""
    if lr_grid is None:
        return DEFAULT_LR_GRID
    if isinstance(lr_grid, str):
        try:
            values = [float(item) for item in lr_grid.split(",") if item.strip()]
        except ValueError:
            raise ValueError(f"lr_grid must be comma-separated numbers, got {lr_grid!r}") from None
    else:
        values = list(lr_grid)
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
            raise TypeError(f"lr_grid must hold numbers, got {values!r}")
    if not values:
        raise ValueError("lr_grid is empty: give at least one multiplier of the typical lr, e.g. '0.3,1,3'")
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if bad:
        raise ValueError(f"lr_grid values must be finite numbers > 0, got {bad!r}")
    return tuple(sorted({float(v) for v in values}))


def sweep_lrs(spec: str, grid: Sequence[float], lr_scale: float = 1.0) -> tuple[float, ...]:
    """The learning rates swept for ``spec``: its typical lr times each multiplier."""
    centre = typical_lr(spec) * lr_scale
    return tuple(float(f"{centre * m:.3g}") for m in grid)


#: Extra lrs the sweep may add beyond each edge of the grid when the best lr sits there.
DEFAULT_LR_EXTEND = 2


def extend_grid(grid: Sequence[float], below: int, above: int) -> tuple[float, ...]:
    """``grid`` with ``below`` more multipliers under it and ``above`` more over it, at the grid's edge spacing."""
    if len(grid) < 2:
        return tuple(grid)
    low_ratio, high_ratio = grid[1] / grid[0], grid[-1] / grid[-2]
    lower = [grid[0] / low_ratio**k for k in range(below, 0, -1)]
    higher = [grid[-1] * high_ratio**k for k in range(1, above + 1)]
    return (*lower, *grid, *higher)


def arena_hyperparameters(spec: str, steps: int) -> dict[str, Any]:
    """Settings the arena gives derivations so that they make sense for a run of ``steps`` steps.

    EMA averages over about a tenth of the run (momentum ``1 - 10 / steps``,
    within [0.9, 0.999]); a piecewise-linear schedule warms up over the first
    10% of the steps.
    """
    extra: dict[str, Any] = {}
    names = derivations(spec)
    if "ema" in names:
        extra["ema_momentum"] = round(min(0.999, max(0.9, 1 - 10 / steps)), 4)
    if "piecewise_linear_lr" in names:
        extra["lr_schedule"] = {max(1, steps // 10): 1.0}
    return extra


def merge_hyperparameters(
    spec: str, steps: int, user: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, Any]:
    """Arena defaults for ``spec`` overlaid with the user's settings for it (never ``lr``)."""
    merged = arena_hyperparameters(spec, steps)
    if user and spec in user:
        merged.update(user[spec])
    return merged


def check_user_hyperparameters(
    hyperparameters: Mapping[str, Mapping[str, Any]] | None, roster: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Validate the per-spec hyperparameters mapping against the roster."""
    if hyperparameters is None:
        return {}
    if not isinstance(hyperparameters, Mapping):
        raise TypeError(f"hyperparameters must map a spec to a dict of settings, got {type(hyperparameters).__name__}")
    unknown = [spec for spec in hyperparameters if spec not in roster]
    if unknown:
        raise ValueError(f"hyperparameters names {unknown!r}, which are not in the roster {list(roster)!r}")
    out: dict[str, dict[str, Any]] = {}
    for spec, settings in hyperparameters.items():
        if not isinstance(settings, Mapping):
            raise TypeError(f"hyperparameters[{spec!r}] must be a dict, got {type(settings).__name__}")
        if "lr" in settings:
            raise ValueError(f"hyperparameters[{spec!r}] sets 'lr'; the arena sweeps lr, use lr_grid instead")
        out[spec] = dict(settings)
    return out
