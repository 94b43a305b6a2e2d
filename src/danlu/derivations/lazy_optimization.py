"""Lazy updates of embedding-like tensors (``extend_with_lazy_optimization``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from danlu._distributed import is_dtensor, placed_like, settle
from danlu._native_spec import Blocks
from danlu.derivations._base import Derivation, checked_patterns, matches_any

__all__ = ["LazyOptimization", "present_rows_mask"]


def present_rows_mask(grad: Tensor, like: Tensor) -> Tensor:
    """1 for the rows (all but the last axis) whose gradient is not all zero, else 0; broadcastable to ``like``."""
    if grad.is_sparse:
        grad = grad.coalesce().to_dense()
    if grad.dim() == 0:
        return grad.ne(0).to(like.dtype)
    # settle: over a sharded last axis (a 1-D FSDP2 parameter) `any` is a pending sum of booleans
    mask = settle(grad.ne(0).any(dim=-1, keepdim=True)).to(like.dtype)
    if is_dtensor(mask) and is_dtensor(like) and tuple(mask.placements) != tuple(like.placements):
        mask = placed_like(mask.expand(like.shape), like)  # in-place ops keep the update's placements
    return mask


class LazyOptimization(Derivation):
    r"""Leave unchanged the rows whose gradient is all zero, bert4keras' ``extend_with_lazy_optimization``.

    For the tensors whose name matches ``include_in_lazy_optimization`` (``re.search``), with
    :math:`d` the update so far and rows taken over all but the last axis:

    .. math::

        \theta_{t,i} = \theta_{t-1,i} + d_i\, [g_{t,i} \neq 0]

    Only the parameter update is masked: the base optimizer's state (Adam's :math:`m`, :math:`v`) still
    decays in the absent rows, as in bert4keras. :class:`danlu.LazyAdam` freezes the state too.

    Keyword arguments: ``include_in_lazy_optimization=()``.

    Example:
        >>> import torch, danlu
        >>> emb = torch.nn.Parameter(torch.ones(3, 2))
        >>> opt = danlu.extend_with_lazy_optimization(danlu.Adam)(
        ...     [("emb", emb)], lr=0.5, include_in_lazy_optimization=["emb"])
        >>> emb.grad = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]); _ = opt.step()
        >>> emb.detach()   # only row 0 moved
        tensor([[0.5000, 0.5000],
                [1.0000, 1.0000],
                [1.0000, 1.0000]])
    """

    name = "lazy"
    title = "LazyOptimization"
    defaults = {"include_in_lazy_optimization": ()}
    name_options = ("include_in_lazy_optimization",)
    has_transform = True
    native = Blocks()
    """The tensors it selects take the generic path."""

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        return checked_patterns(options, "include_in_lazy_optimization")

    def selects(self, group: Mapping[str, Any], name: str | None) -> bool:
        patterns = tuple(group["include_in_lazy_optimization"])
        return bool(patterns) and name is not None and matches_any(patterns, name)

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
        for update, grad in zip(updates, grads):
            update.mul_(present_rows_mask(grad, update))
