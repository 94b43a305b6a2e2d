"""``compile_step(opt)``: ``torch.compile(opt.step)``, kept as a name for code that used it.

Every danlu optimizer and derived stack traces as it is (see the compile section of
docs/performance.md): the group counters and ``state[p]["step"]`` are tensors, the lr enters the
graph as an input, and the decisions of gradient accumulation and Lookahead act through
``torch.where``. So ``torch.compile(opt.step)`` is the way; this wrapper adds nothing to it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["compile_step"]


def compile_step(opt: torch.optim.Optimizer, **compile_kwargs: Any) -> Callable[..., Any]:
    """``torch.compile(opt.step, **compile_kwargs)``, for any optimizer.

    Example:
        >>> import torch, danlu
        >>> from danlu.compiled import compile_step
        >>> Stack = danlu.extend_with_lookahead(danlu.extend_with_gradient_accumulation(
        ...     danlu.extend_with_piecewise_linear_lr(danlu.AdamW)))
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> opt = Stack([w], lr=1e-3, lr_schedule={10: 1.0}, grad_accum_steps=2)
        >>> step = compile_step(opt, backend="eager")
        >>> w.grad = torch.ones(3); step()
    """
    return torch.compile(opt.step, **compile_kwargs)
