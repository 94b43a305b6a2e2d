"""The exponential moving averages of the gradient and its square that Adam, NAdam and RAdam share.

.. math::

    m_t = \\beta_1 m_{t-1} + (1-\\beta_1) g_t, \\qquad v_t = \\beta_2 v_{t-1} + (1-\\beta_2) g_t^2
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["init_moments", "update_moments", "update_moments_foreach"]


def init_moments(p: Tensor, state: dict[str, Any]) -> None:
    """Create ``exp_avg`` and ``exp_avg_sq``, zeros shaped like ``p``."""
    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def update_moments(state: dict[str, Any], grad: Tensor, betas: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """Advance both moments of one tensor in place; return (m_t, v_t)."""
    beta1, beta2 = betas
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    return exp_avg, exp_avg_sq


def update_moments_foreach(
    states: list[dict[str, Any]], grads: list[Tensor], betas: tuple[float, float]
) -> tuple[list[Tensor], list[Tensor]]:
    """Advance the moments of a list of tensors in place with foreach kernels; return (m, v) lists."""
    beta1, beta2 = betas
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    return exp_avgs, exp_avg_sqs
