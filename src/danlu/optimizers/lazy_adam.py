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
    """The rows a gradient touches and their values, as (indices, values): the same for a sparse gradient and its dense equivalent.

    Rows are the gradient's elements over all but its last axis (one row for a 0-D or 1-D
    tensor), numbered in row-major order; a row is present when its gradient is not all zero. A
    sparse COO gradient is coalesced (duplicate indices are summed). When its sparse dimensions
    are exactly the row axes (``nn.Embedding(sparse=True)``), its rows are read from its indices
    without densifying; any other sparse gradient (element-sparse, such as
    ``torch.gather(..., sparse_grad=True)``) is made dense first.
    """
    if grad.is_sparse:
        grad = grad.coalesce()
        if grad.dim() >= 2 and grad.sparse_dim() == grad.dim() - 1:
            index, values = _row_index(grad.indices(), grad.shape[:-1]), grad.values()
            keep = values.ne(0).any(dim=1)
            if not bool(keep.all()):
                index, values = index[keep], values[keep]
            return index, values
        grad = grad.to_dense()
    rows = grad.reshape(-1, grad.shape[-1]) if grad.dim() > 1 else grad.reshape(1, -1)
    index = rows.ne(0).any(dim=1).nonzero().squeeze(1)
    return index, rows.index_select(0, index)


def _row_index(indices: Tensor, row_shape: torch.Size) -> Tensor:
    """Row-major numbers of the rows given by a sparse tensor's ``(len(row_shape), nnz)`` indices."""
    if indices.shape[0] == 1:
        return indices[0]
    strides = [1] * len(row_shape)
    for axis in range(len(row_shape) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * row_shape[axis + 1]
    return (indices * torch.tensor(strides, dtype=indices.dtype, device=indices.device).unsqueeze(1)).sum(dim=0)


def _as_rows(x: Tensor) -> Tensor:
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
    which only matters for large :math:`\epsilon`). Rows are the elements over all but the last
    axis (a 0-D or 1-D tensor is one row), and the rows whose gradient is all zero are absent.
    Sparse COO gradients (``nn.Embedding(sparse=True)``, ``torch.gather(..., sparse_grad=True)``)
    act exactly as their dense equivalents. Arguments are those of :class:`danlu.Adam`.

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
        if not all(t.is_contiguous() for t in (p, state["exp_avg"], state["exp_avg_sq"])):  # e.g. channels_last
            return self._update_masked(group, grad.to_dense() if grad.is_sparse else grad, state, lr, step)
        beta1, beta2 = group["betas"]
        index, values = present_rows(grad)
        exp_avg = _as_rows(state["exp_avg"])
        exp_avg_sq = _as_rows(state["exp_avg_sq"])
        m = exp_avg.index_select(0, index).lerp_(values, 1 - beta1)
        v = exp_avg_sq.index_select(0, index).mul_(beta2).addcmul_(values, values, value=1 - beta2)
        exp_avg.index_copy_(0, index, m)
        exp_avg_sq.index_copy_(0, index, v)
        correction1, sqrt_correction2 = self._corrections(group, step)
        rows = m.div_(v.sqrt_().div_(sqrt_correction2).add_(group["eps"])).mul_(-lr / correction1)
        update = torch.zeros_like(p, dtype=rows.dtype)
        _as_rows(update).index_copy_(0, index, rows)
        return update

    def _update_masked(self, group: Mapping[str, Any], grad: Tensor, state: dict[str, Any], lr: float, step: float) -> Tensor:
        """The same update with a row mask instead of row indices.

        For FSDP2's DTensors (no ``nonzero``), for tensors whose rows are not a view (``channels_last``)
        and for traced steps (no data-dependent shapes).
        """
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
