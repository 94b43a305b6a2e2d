"""Per-parameter learning-rate multipliers (``extend_with_parameter_wise_lr``)."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from danlu._native_spec import Fold
from danlu._validate import check_multipliers
from danlu.derivations._base import Derivation

__all__ = ["ParameterWiseLR"]


@functools.lru_cache(maxsize=65536)
def _multiplier(schedule: tuple[tuple[str, float], ...], name: str) -> float | None:
    factors = [value for key, value in schedule if key in name]
    return math.prod(factors) if factors else None


def _selected_multiplier(group: Mapping[str, Any], name: str | None) -> float:
    multiplier = ParameterWiseLR.multiplier(group, name)
    return 1.0 if multiplier is None else float(multiplier)


class ParameterWiseLR(Derivation):
    r"""Multiply the update of each tensor by the values of the schedule keys found in its name.

    bert4keras' ``extend_with_parameter_wise_lr``: for a tensor named :math:`n`,

    .. math::

        \theta_t = \theta_{t-1} + d \prod_{k \in \text{schedule},\ k \subseteq n} \text{schedule}[k]

    where :math:`k \subseteq n` means that the key is a substring of the name (plain substring, not a
    regular expression) and :math:`d` is the update so far. Tensors that no key matches keep :math:`d`.

    Keyword arguments: ``paramwise_lr_schedule={}`` (values finite and >= 0).

    Example:
        >>> import torch, danlu
        >>> a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        >>> opt = danlu.extend_with_parameter_wise_lr(danlu.SGD)(
        ...     [("a.weight", a), ("b.weight", b)], lr=1.0, paramwise_lr_schedule={"a.": 0.5})
        >>> a.grad = torch.ones(1); b.grad = torch.ones(1); _ = opt.step()
        >>> a.item(), b.item()
        (-0.5, -1.0)
    """

    name = "paramwise_lr"
    title = "ParameterWiseLR"
    defaults: dict[str, Any] = {"paramwise_lr_schedule": {}}
    name_options = ("paramwise_lr_schedule",)
    has_transform = True
    native = Fold(lambda group, name: (_selected_multiplier(group, name), 0.0))
    """Fused: ``d <- m d``."""

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        if "paramwise_lr_schedule" not in options:
            return {}
        return {"paramwise_lr_schedule": check_multipliers("paramwise_lr_schedule", options["paramwise_lr_schedule"])}

    @staticmethod
    def multiplier(group: Mapping[str, Any], name: str | None) -> float | None:
        schedule = group["paramwise_lr_schedule"]
        if not schedule or name is None:
            return None
        return _multiplier(tuple(schedule.items()), name)

    def selects(self, group: Mapping[str, Any], name: str | None) -> bool:
        return self.multiplier(group, name) is not None

    def transform(
        self,
        host: Any,
        group: Mapping[str, Any],
        olds: list[Tensor],
        updates: list[Tensor],
        grads: list[Tensor],
        names: list[str | None],
        lrs: list[float],
    ) -> None:
        torch._foreach_mul_(updates, [self.multiplier(group, n) for n in names])  # type: ignore[misc]
