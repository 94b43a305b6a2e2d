"""Hyperparameter checks shared by every optimizer and derivation.

Every check raises before anything changes: a ``TypeError`` when the value has
the wrong type, a ``ValueError`` when it is out of range. Both messages name the
argument and the value, in the style of ``torch.optim``
(``Invalid lr: -1.0 (expected a finite number >= 0)``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from numbers import Real
from typing import Any

import torch

__all__ = [
    "check_bool",
    "check_int",
    "check_number",
    "check_optional_number",
    "check_betas",
    "check_patterns",
    "check_schedule",
    "check_multipliers",
]


def _as_real(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"Invalid {name}: expected a number, got a tensor of shape {tuple(value.shape)}")
        return float(value.item())
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"Invalid {name}: expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Check that ``value`` is a finite real number in the given range and return it as a float."""
    number = _as_real(name, value)
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high:g}")
    requirement = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (expected {requirement})")
    return number


def check_optional_number(name: str, value: Any, **bounds: Any) -> float | None:
    """Like :func:`check_number`, but ``None`` is accepted and returned as is."""
    return None if value is None else check_number(name, value, **bounds)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: expected True or False, got {type(value).__name__} {value!r}")
    return value


def check_int(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name}: expected an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= {low})")
    return value


def check_betas(name: str, betas: Any, count: int = 2) -> tuple[float, ...]:
    """Check a tuple of ``count`` betas, each in [0, 1)."""
    if isinstance(betas, (str, bytes)) or not isinstance(betas, Iterable):
        raise TypeError(f"Invalid {name}: expected a tuple of {count} numbers, got {betas!r}")
    values = tuple(betas)
    if len(values) != count:
        raise ValueError(f"Invalid {name}: expected {count} values, got {len(values)} ({betas!r})")
    for index, beta in enumerate(values):
        check_number(f"beta parameter at index {index} ({name}[{index}])", beta, low=0.0, high=1.0, high_open=True)
    return tuple(float(_as_real(name, b)) for b in values)


def check_patterns(name: str, patterns: Any) -> tuple[str, ...]:
    """Check a list of regular expressions (a single string is one pattern)."""
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Iterable):
        raise TypeError(f"Invalid {name}: expected a list of strings, got {type(patterns).__name__} {patterns!r}")
    checked = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"Invalid {name}: every pattern must be a string, got {type(pattern).__name__} {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"Invalid {name}: pattern {pattern!r} does not compile ({error})") from None
        checked.append(pattern)
    return tuple(checked)


def check_schedule(name: str, schedule: Any) -> dict[int, float]:
    """Check a piecewise-linear schedule: a non-empty dict of int steps >= 0 to finite multipliers >= 0."""
    if not isinstance(schedule, Mapping):
        raise TypeError(f"Invalid {name}: expected a dict of step -> multiplier, got {type(schedule).__name__} {schedule!r}")
    if not schedule:
        raise ValueError(f"Invalid {name}: {schedule!r} (expected a non-empty dict of step -> multiplier)")
    checked: dict[int, float] = {}
    for step, value in schedule.items():
        check_int(f"{name} key", step, low=0)
        checked[step] = check_number(f"{name}[{step}]", value, low=0.0)
    return dict(sorted(checked.items()))


def check_multipliers(name: str, multipliers: Any) -> dict[str, float]:
    """Check a dict of name substring -> finite multiplier >= 0."""
    if not isinstance(multipliers, Mapping):
        raise TypeError(f"Invalid {name}: expected a dict of name -> multiplier, got {type(multipliers).__name__} {multipliers!r}")
    checked: dict[str, float] = {}
    for key, value in multipliers.items():
        if not isinstance(key, str):
            raise TypeError(f"Invalid {name}: every key must be a string, got {type(key).__name__} {key!r}")
        checked[key] = check_number(f"{name}[{key!r}]", value, low=0.0)
    return checked
