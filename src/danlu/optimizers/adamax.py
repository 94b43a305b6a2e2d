"""Adamax (Kingma & Ba), the torch.optim.Adamax formula."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from danlu._native_spec import Kernel, NativeSpec
from danlu._validate import check_betas, check_number
from danlu.base import DanluOptimizer, ParamsT

__all__ = ["Adamax"]


def _native_coefficients(group: Mapping[str, Any], state: Mapping[str, Any], lr: float, step: float) -> list[float]:
    beta1, beta2 = group["betas"]
    return [1 - beta1, beta2, group["eps"], -lr / (1 - beta1**step)]


class Adamax(DanluOptimizer):
    r"""Adamax (Kingma & Ba, 2015, section 7.1): Adam with the infinity norm in place of the second moment.

    .. math::

        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon),

        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\, \frac{m_t}{u_t}

    The ``torch.optim.Adamax`` formula and operation order (``eps`` added to :math:`|g_t|` inside the
    maximum). Its coupled ``weight_decay`` is not an argument: use ``extend_with_weight_decay`` for the
    decoupled decay.

    Args:
        params: tensors, parameter groups or ``(name, tensor)`` pairs.
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon \ge 0`.
        foreach: ``False`` runs the per-tensor reference loop.
        state_dtype: dtype of the state and the arithmetic (default: float32 for 16-bit parameters, else theirs).
        stochastic_rounding: round bfloat16 parameter writes stochastically (unbiased; see ``danlu._precision``).

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> opt = danlu.Adamax([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, -2.0]); _ = opt.step()   # first step: -lr * g / (|g| + eps)
        >>> w.detach()
        tensor([0.9000, 1.1000])
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps)
        super().__init__(params, defaults, foreach=foreach, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)

    def _check_hyperparameters(self, options: Mapping[str, Any]) -> None:
        super()._check_hyperparameters(options)
        check_betas("betas", options["betas"])
        check_number("eps", options["eps"], low=0.0)

    def _init_state(self, p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    supports_complex = True  # updated as (real, imaginary) pairs, as torch.optim does
    native: ClassVar[NativeSpec | None] = NativeSpec(Kernel.ADAMAX, lambda group: ("exp_avg", "exp_inf"), _native_coefficients)
    """The native kernel (see ``danlu._native_spec``)."""

    def _update_single(
        self, group: Mapping[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, step: float
    ) -> Tensor:
        beta1, beta2 = group["betas"]
        exp_avg, exp_inf = state["exp_avg"], state["exp_inf"]
        exp_avg.lerp_(grad, 1 - beta1)
        torch.maximum(exp_inf.mul_(beta2), grad.abs().add_(group["eps"]), out=exp_inf)
        return exp_avg.div(exp_inf).mul_(-lr / (1 - beta1**step))

    def _update_foreach(
        self,
        group: Mapping[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lrs: list[float],
        steps: list[float],
    ) -> list[Tensor]:
        beta1, beta2 = group["betas"]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_infs = [s["exp_inf"] for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_infs, beta2)
        bounds = torch._foreach_abs(grads)
        torch._foreach_add_(bounds, group["eps"])
        torch._foreach_maximum_(exp_infs, bounds)
        updates = torch._foreach_div(exp_avgs, exp_infs)
        torch._foreach_mul_(updates, [-lr / (1 - beta1**t) for lr, t in zip(lrs, steps)])
        return updates
