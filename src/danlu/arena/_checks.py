"""Argument checks for the arena: each bad value raises before any training.

Every error names the argument and the value, so that the command line can
print it as one clean line.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

#: Why a count must be at least one, where that is not plain from its name.
_AT_LEAST_ONE_BECAUSE = {
    "steps": "a budget of zero trains nothing",
    "seeds": "a budget of zero trains nothing",
    "threads": "torch runs on at least one CPU thread",
}


def check_optional_positive_int(name: str, value: Any) -> int | None:
    """Return None, or ``value`` as an int >= 1; else raise."""
    return None if value is None else check_positive_int(name, value)


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` as an int >= 1, else raise."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        because = _AT_LEAST_ONE_BECAUSE.get(name)
        raise ValueError(f"{name} must be >= 1, got {value!r}" + (f" ({because})" if because else ""))
    return int(value)


def check_positive_float(name: str, value: Any) -> float:
    """Return ``value`` as a finite float > 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return number


def check_fraction(name: str, value: Any) -> float:
    """Return ``value`` as a float in (0, 1), else raise."""
    number = check_positive_float(name, value)
    if number >= 1:
        raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    return number
