"""LazyAdam: Adam that touches only the rows present in the gradient."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from danlu._distributed import is_dtensor, placed_like, settle
from danlu.optimizers.adam import Adam

__all__ = ["LazyAdam", "present_rows"]


def present_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """The rows a gradient touches and their values, as (indices, values).

    A sparse COO gradient (``nn.Embedding(sparse=True)``) is coalesced (duplicate indices are summed)
    and its rows are its indices along the first dimension. A dense gradient is viewed as rows over
    all but its last axis; the rows that are not all zero are present.
    """
    if grad.is_sparse:
        grad = grad.coalesce()
        return grad.indices()[0], grad.values()
    rows = grad.reshape(-1, grad.shape[-1]) if grad.dim() > 1 else grad.reshape(1, -1)
    index = rows.ne(0).any(dim=1).nonzero().squeeze(1)
    return index, rows.index_select(0, index)


def _as_rows(x: Tensor, sparse: bool) -> Tensor:
    if sparse:
        return x
    return x.view(-1, x.shape[-1]) if x.dim() > 1 else x.view(1, -1)


class LazyAdam(Adam):
    r"""Adam whose moments and parameters change only in the rows present in the gradient.

    For the present rows :math:`i`, with the step count :math:`t` of the tensor (every step counts):

    .. math::

        m_{t,i} = \beta_1 m_{t-1,i} + (1-\beta_1) g_{t,i}, \qquad
        v_{t,i} = \beta_2 v_{t-1,i} + (1-\beta_2) g_{t,i}^2, \qquad
        \theta_{t,i} = \theta_{t-1,i} - \eta\, \frac{m_{t,i}/(1-\beta_1^t)}{\sqrt{v_{t,i}/(1-\beta_2^t)} + \epsilon}

    and every other row of :math:`m`, :math:`v` and :math:`\theta` is left as it is (the
    tensorflow-addons ``LazyAdam`` semantics; TFA puts :math:`\epsilon` in a slightly different place,
    which only matters for large :math:`\epsilon`). Sparse COO gradients from
    ``nn.Embedding(sparse=True)`` are accepted; with a dense gradient, the rows (all but the last
    axis) whose gradient is all zero are absent. Arguments are those of :class:`danlu.Adam`.

    Example:
        >>> import torch, danlu
        >>> emb = torch.nn.Embedding(4, 2, sparse=True)
        >>> opt = danlu.LazyAdam(emb.parameters(), lr=0.1)
        >>> before = emb.weight.detach().clone()
        >>> emb(torch.tensor([1])).sum().backward(); _ = opt.step()
        >>> (emb.weight.detach() != before).any(dim=1).tolist()
        [False, True, False, False]
    """

    supports_sparse = True

    def _update_single(
        self, group: Mapping[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, step: float
    ) -> Tensor:
        if is_dtensor(grad) or (isinstance(step, Tensor) and not grad.is_sparse):  # traced: no data-dependent shapes
            return self._update_masked(group, grad, state, lr, step)
        beta1, beta2 = group["betas"]
        index, values = present_rows(grad)
        sparse = grad.is_sparse
        exp_avg = _as_rows(state["exp_avg"], sparse)
        exp_avg_sq = _as_rows(state["exp_avg_sq"], sparse)
        m = exp_avg.index_select(0, index).lerp_(values, 1 - beta1)
        v = exp_avg_sq.index_select(0, index).mul_(beta2).addcmul_(values, values, value=1 - beta2)
        exp_avg.index_copy_(0, index, m)
        exp_avg_sq.index_copy_(0, index, v)
        correction1, sqrt_correction2 = self._corrections(group, step)
        rows = m.div_(v.sqrt_().div_(sqrt_correction2).add_(group["eps"])).mul_(-lr / correction1)
        update = torch.zeros_like(p, dtype=rows.dtype)
        _as_rows(update, sparse).index_copy_(0, index, rows)
        return update

    def _update_masked(self, group: Mapping[str, Any], grad: Tensor, state: dict[str, Any], lr: float, step: float) -> Tensor:
        """The same update with a row mask instead of row indices, for FSDP2's DTensors and traced steps (no ``nonzero``)."""
        beta1, beta2 = group["betas"]
        present = grad.ne(0) if grad.dim() == 0 else settle(grad.ne(0).any(dim=-1, keepdim=True))
        present = placed_like(present.expand(grad.shape), grad)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        m = torch.where(present, exp_avg.lerp(grad, 1 - beta1), exp_avg)
        v = torch.where(present, exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2), exp_avg_sq)
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
        correction1, sqrt_correction2 = self._corrections(group, step)
        update = m.div_(v.sqrt_().div_(sqrt_correction2).add_(group["eps"])).mul_(-lr / correction1)
        return torch.where(present, update, torch.zeros_like(update))

    def _update_foreach(
        self,
        group: Mapping[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lrs: list[float],
        steps: list[float],
    ) -> list[Tensor]:
        return [self._update_single(group, p, g, s, lr, t) for p, g, s, lr, t in zip(params, grads, states, lrs, steps)]
