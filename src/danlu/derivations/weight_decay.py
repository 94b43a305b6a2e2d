"""Decoupled weight decay (``extend_with_weight_decay``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from danlu._validate import check_number
from danlu.derivations._base import Derivation, checked_patterns, matches_any

__all__ = ["WeightDecay"]


class WeightDecay(Derivation):
    r"""Decoupled weight decay (Loshchilov & Hutter, 2019), bert4keras' ``extend_with_weight_decay``.

    .. math::

        \theta_t = \theta_t^{\text{base}} - \eta_t\, \lambda\, \theta_{t-1}

    where :math:`\theta_t^{\text{base}}` is the parameter after the base optimizer's update (and the
    transforms of inner derivations), :math:`\eta_t` the group's effective lr and :math:`\lambda` the
    ``weight_decay_rate``. Tensors whose name matches a pattern of ``exclude_from_weight_decay``
    (``re.search``) are not decayed. On Adam this is AdamW; on ``torch.optim.Adam`` it equals
    ``torch.optim.AdamW``.

    Keyword arguments: ``weight_decay_rate=0.01`` (>= 0), ``exclude_from_weight_decay=()``.

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> opt = danlu.extend_with_weight_decay(danlu.SGD)([("w", w)], lr=0.5, weight_decay_rate=0.1)
        >>> w.grad = torch.zeros(1); _ = opt.step(); round(w.item(), 6)   # 1 - 0.5 * 0.1 * 1
        0.95
    """

    name = "weight_decay"
    title = "WeightDecay"
    defaults = {"weight_decay_rate": 0.01, "exclude_from_weight_decay": ()}
    name_options = ("exclude_from_weight_decay",)
    has_transform = True

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        checked: dict[str, Any] = {}
        if "weight_decay_rate" in options:
            checked["weight_decay_rate"] = check_number("weight_decay_rate", options["weight_decay_rate"], low=0.0)
        return {**checked, **checked_patterns(options, "exclude_from_weight_decay")}

    def selects(self, group: Mapping[str, Any], name: str | None) -> bool:
        if group["weight_decay_rate"] == 0:
            return False
        patterns = tuple(group["exclude_from_weight_decay"])
        return not (patterns and name is not None and matches_any(patterns, name))

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
        rate = group["weight_decay_rate"]
        if any(isinstance(lr, Tensor) for lr in lrs):  # traced: lr_t is a tensor, which alpha cannot take
            torch._foreach_add_(updates, torch._foreach_mul(olds, [lr * -rate for lr in lrs]))
            return
        if len(set(lrs)) == 1 and len({(t.device, t.dtype) for t in [*updates, *olds]}) == 1:
            torch._foreach_add_(updates, olds, alpha=-lrs[0] * rate)
            return
        for u, p, lr in zip(updates, olds, lrs):
            u.add_(p.to(u.dtype), alpha=-lr * rate)
