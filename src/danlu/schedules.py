"""Learning-rate schedules as pure functions of the step."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["piecewise_linear"]


def piecewise_linear(step: float, schedule: Mapping[int, float], from_zero: bool = True) -> float:
    """The value at ``step`` of the piecewise-linear function through the points of ``schedule``.

    As bert4keras' ``piecewise_linear``: ``schedule`` maps steps to values; between two keys the value
    is interpolated linearly, after the last key it stays at the last value, and (with ``from_zero``)
    the function starts from 0 at step 0 unless the schedule has a key 0.

    Example:
        >>> schedule = {1000: 1.0, 2000: 0.1}
        >>> [piecewise_linear(t, schedule) for t in (0, 500, 1000, 1500, 2000, 5000)]
        [0.0, 0.5, 1.0, 0.55, 0.1, 0.1]
    """
    points = sorted((int(k), float(v)) for k, v in schedule.items())
    if from_zero and points[0][0] != 0:
        points.insert(0, (0, 0.0))
    value = points[0][1]
    for i, (begin, start_value) in enumerate(points):
        if step < begin:
            break
        if i + 1 < len(points):
            end, end_value = points[i + 1]
            slope = (end_value - start_value) / (end - begin)
            value = start_value + slope * (step - begin)
        else:
            value = start_value
    return value
