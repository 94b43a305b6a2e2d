"""Decoupled weight decay (``extend_with_weight_decay``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from danlu._native_spec import Fold
from danlu._validate import check_number
from danlu.derivations._base import Derivation, checked_patterns, matches_any

__all__ = ["WeightDecay", "adopt_torch_weight_decay"]


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
    native = Fold(lambda group, name: (1.0, -group["weight_decay_rate"]))
    """Fused: ``d <- d - lr * rate * p``."""

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


def adopt_torch_weight_decay(host: Any, group: dict[str, Any]) -> None:
    """Read a torch-style ``weight_decay`` entry of a param group as torch would mean it, or refuse it.

    ``torch.optim`` reads a group's ``weight_decay`` as that group's decay; ``transformers.Trainer``
    builds such groups (0.0 for biases and normalization weights). When the base optimizer takes no
    ``weight_decay`` of its own (danlu's optimizers):

    * with decoupled decay (``extend_with_weight_decay``, ``AdamW``, ``Lamb``) the entry is the group's
      ``weight_decay_rate`` (and is removed, so that the group names the decay once);
    * without it, a ``weight_decay`` > 0 raises a ``ValueError``: torch would decay, danlu would not.

    A base that takes ``weight_decay`` itself (``torch.optim.Adam``) keeps the entry for its own decay.
    """
    if "weight_decay" not in group or "weight_decay" in host.defaults:
        return
    index = len(getattr(host, "param_groups", ()))
    value = group["weight_decay"]
    if any(isinstance(d, WeightDecay) for d in host._danlu_derivations):
        if "weight_decay_rate" in group and group["weight_decay_rate"] != value:
            raise ValueError(
                f"param group {index} sets both weight_decay={value!r} (torch's name) and "
                f"weight_decay_rate={group['weight_decay_rate']!r}: give one of them"
            )
        group["weight_decay_rate"] = group.pop("weight_decay")
        return
    from danlu.base import DanluOptimizer

    if isinstance(host, DanluOptimizer) and value != 0:
        raise ValueError(
            f"param group {index} has weight_decay={value!r}, but {type(host).__name__} has no weight decay of its own: "
            "use a class with decoupled decay (danlu.AdamW, extend_with_weight_decay), whose groups read weight_decay "
            "as weight_decay_rate"
        )
