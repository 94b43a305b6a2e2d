"""Complex parameters: updated as ``torch.optim`` updates them, as (real, imaginary) pairs.

A danlu algorithm sees a complex parameter, its gradient and its state through
``torch.view_as_real`` views, so every element-wise formula treats the real and the imaginary
part as two real numbers and every norm over the view is the complex norm. The view of a tensor
whose last axis is contiguous merges that axis with the pair axis (``(..., C)`` complex ->
``(..., 2C)`` real), so that a row (all but the last axis) of the view is a row of the complex
tensor: LazyAdam and lazy optimization keep their meaning. The state itself stays complex, shaped
like the parameter, as in ``torch.optim``. The native kernels never see complex tensors (they take
only float32 and float64), so the views are made only for the tensors they leave.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["as_real", "reject_complex"]


def reject_complex(opt: Any) -> None:
    """Raise a ``ValueError`` naming the first complex parameter with a gradient (for an algorithm that cannot take it)."""
    for g, group in enumerate(opt.param_groups):
        for i, (name, p) in enumerate(zip(opt._names(group), group["params"])):
            if p.grad is not None and p.is_complex():
                label = repr(name) if name else f"{i} of param group {g}"
                raise ValueError(
                    f"{type(opt).__name__} does not support complex parameters (parameter {label}, {p.dtype}): "
                    "pass torch.view_as_real(p) as a real parameter, or use an optimizer that takes complex ones"
                )


def as_real(
    params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]]
) -> tuple[list[Tensor], list[Tensor], list[dict[str, Any]]]:
    """The lists with every complex parameter, its gradient and its complex state replaced by real views."""
    if not any(p.is_complex() for p in params):
        return params, grads, states
    params, grads, states = list(params), list(grads), list(states)
    for i, p in enumerate(params):
        if not p.is_complex():
            continue
        grad = grads[i].to_dense() if grads[i].is_sparse else grads[i]
        grad = grad.resolve_conj()
        merge = p.dim() > 0 and all(t.stride(-1) == 1 for t in (p, grad, *_complex_tensors(states[i].values())))
        params[i], grads[i] = _real(p, merge), _real(grad, merge)
        states[i] = _RealState(states[i], merge, tuple(params[i].shape))
    return params, grads, states


def _complex_tensors(values: Iterable[Any]) -> list[Tensor]:
    return [v for v in values if isinstance(v, Tensor) and v.is_complex()]


def _real(t: Tensor, merge: bool) -> Tensor:
    real = torch.view_as_real(t)
    return real.flatten(-2) if merge else real


class _RealState(dict):
    """A parameter's state with its complex tensors as real views; a real tensor of the view's shape stored here is stored complex."""

    def __init__(self, state: dict[str, Any], merge: bool, shape: tuple[int, ...]) -> None:
        super().__init__({k: _real(v, merge) if isinstance(v, Tensor) and v.is_complex() else v for k, v in state.items()})
        self._state, self._merge, self._shape = state, merge, shape

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, Tensor) and value.is_floating_point() and tuple(value.shape) == self._shape:
            pairs = value.unflatten(-1, (-1, 2)) if self._merge else value
            stored = torch.view_as_complex(pairs.contiguous())
            self._state[key] = stored
            value = _real(stored, self._merge)
        else:
            self._state[key] = value
        super().__setitem__(key, value)
