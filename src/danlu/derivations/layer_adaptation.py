"""LAMB's layer adaptation (``extend_with_layer_adaptation``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from danlu._distributed import any_dtensor, whole_norms
from danlu._native_spec import TrustRatio
from danlu.derivations._base import Derivation, by_device_and_dtype, checked_patterns, matches_any

__all__ = ["LayerAdaptation", "MIN_LR"]

MIN_LR = 1e-7
"""The floor of the lr that the update is divided by (bert4keras' ``K.epsilon()``)."""


class LayerAdaptation(Derivation):
    r"""The layer-wise trust ratio of LAMB (You et al., 2020), bert4keras' ``extend_with_layer_adaptation``.

    With :math:`d` the update so far (base optimizer and inner derivations) and :math:`\eta_t` the
    group's effective lr:

    .. math::

        r = \frac{\lVert\theta_{t-1}\rVert}{\lVert d / \max(\eta_t, 10^{-7})\rVert}
        \ (r = 1 \text{ if either norm is } 0), \qquad \theta_t = \theta_{t-1} + r\, d

    Tensors whose name matches ``exclude_from_layer_adaptation`` keep :math:`d`. Applied over
    ``extend_with_weight_decay(Adam)``, this is LAMB (``danlu.Lamb``).

    Keyword arguments: ``exclude_from_layer_adaptation=()``.

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))   # ||w|| = 5
        >>> opt = danlu.extend_with_layer_adaptation(danlu.SGD)([("w", w)], lr=0.1)
        >>> w.grad = torch.tensor([1.0, 0.0]); _ = opt.step()  # d = [-0.1, 0], ||d / lr|| = 1: r = 5
        >>> w.detach()
        tensor([2.5000, 4.0000])
    """

    name = "layer_adaptation"
    title = "LayerAdaptation"
    defaults = {"exclude_from_layer_adaptation": ()}
    name_options = ("exclude_from_layer_adaptation",)
    has_transform = True
    native = TrustRatio(MIN_LR)
    """Fused: the trust ratio, in two passes (norms, then the write)."""

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return checked_patterns(options, "exclude_from_layer_adaptation")

    def selects(self, group: Mapping[str, Any], name: str | None) -> bool:
        patterns = tuple(group["exclude_from_layer_adaptation"])
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
        for bucket in by_device_and_dtype(updates):
            bucket_updates = [updates[i] for i in bucket]
            ratios = trust_ratios([olds[i] for i in bucket], bucket_updates, [lrs[i] for i in bucket])
            if any_dtensor(bucket_updates):
                for update, ratio in zip(bucket_updates, ratios):
                    update.mul_(ratio)
            else:
                torch._foreach_mul_(bucket_updates, ratios)


def trust_ratios(params: list[Tensor], updates: list[Tensor], lrs: list[float]) -> list[Tensor]:
    """The trust ratio of each (parameter, update) pair, as 0-dim tensors on the updates' device.

    The norms are those of the whole tensors, also when they are shards of FSDP2 DTensors.
    """
    dtype = updates[0].real.dtype  # the norms of complex tensors are real
    param_norms = torch.stack(whole_norms(params, dtype))
    update_norms = torch.stack(whole_norms(updates))
    if any(isinstance(lr, Tensor) for lr in lrs):  # traced: the lrs are 0-dim tensors
        lr_values = torch.stack([torch.as_tensor(lr).to(update_norms.dtype) for lr in lrs]).to(update_norms.device)
        scale = torch.clamp(lr_values, min=MIN_LR)
    else:
        scale = torch.tensor([max(lr, MIN_LR) for lr in lrs], dtype=update_norms.dtype, device=update_norms.device)
    update_norms = update_norms / scale
    ratio = torch.where(
        (param_norms > 0) & (update_norms > 0), param_norms / update_norms, torch.ones_like(param_norms)
    )
    return list(ratio.unbind())
