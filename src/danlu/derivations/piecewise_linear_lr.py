"""A piecewise-linear learning-rate multiplier (``extend_with_piecewise_linear_lr``)."""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from danlu._native_spec import NoTensorWork
from danlu._validate import check_schedule
from danlu.derivations._base import APPLIED_STEPS, Derivation
from danlu.schedules import piecewise_linear

__all__ = ["PiecewiseLinearLR"]


class PiecewiseLinearLR(Derivation):
    r"""Multiply the lr by a piecewise-linear function of the number of steps already applied.

    bert4keras' ``extend_with_piecewise_linear_lr``: at the step that follows :math:`s` applied steps the
    group's lr is :math:`\eta \cdot f(s)`, with :math:`f` = :func:`danlu.schedules.piecewise_linear`
    through the points of ``lr_schedule`` (from 0 at step 0 unless the schedule has a key 0). So
    ``{1000: 1, 2000: 0.1}`` warms up linearly over 1000 steps, decays to 10% at step 2000, then stays.
    The multiplied lr is the :math:`\eta_t` that weight decay and layer adaptation see; a torch LR
    scheduler sets :math:`\eta`, this multiplies it. Buffering calls of gradient accumulation do not count.

    Keyword arguments: ``lr_schedule={0: 1}``.

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = danlu.extend_with_piecewise_linear_lr(danlu.SGD)([w], lr=1.0, lr_schedule={2: 1.0})
        >>> for _ in range(3):   # multipliers 0, 0.5, 1
        ...     w.grad = torch.ones(1); _ = opt.step(); print(w.item())
        0.0
        -0.5
        -1.5
    """

    name = "piecewise_linear_lr"
    title = "PiecewiseLinearLR"
    defaults = {"lr_schedule": {0: 1.0}}
    native = NoTensorWork()
    """Acts through the lr multiplier only."""

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        if "lr_schedule" not in options:
            return {}
        return {"lr_schedule": check_schedule("lr_schedule", options["lr_schedule"])}

    def lr_multiplier(self, group: Mapping[str, Any]) -> Any:
        if torch.compiler.is_compiling():
            return piecewise_linear_tensor(group[APPLIED_STEPS], group["lr_schedule"])
        return piecewise_linear(int(group[APPLIED_STEPS]), group["lr_schedule"])


def piecewise_linear_tensor(step: Tensor, schedule: Mapping[int, float]) -> Tensor:
    """:func:`danlu.schedules.piecewise_linear` of a 0-dim tensor step, as tensor ops (float64).

    The schedule's points are constants of the traced graph; the step is its input.
    """
    points = sorted((int(k), float(v)) for k, v in schedule.items())
    if points[0][0] != 0:
        points.insert(0, (0, 0.0))
    t = step.to(torch.float64)
    value = torch.full_like(t, points[-1][1])
    for (begin, start), (end, stop) in reversed(list(itertools.pairwise(points))):
        value = torch.where(t < end, start + (stop - start) / (end - begin) * (t - begin), value)
    return value
