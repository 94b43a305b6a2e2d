"""RMSprop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from danlu._native_spec import Kernel, NativeSpec
from danlu._validate import check_bool, check_number
from danlu.base import DanluOptimizer, ParamsT

__all__ = ["RMSprop"]


def _native_state_keys(group: Mapping[str, Any]) -> tuple[str | None, ...]:
    return ("square_avg", "momentum_buffer" if group["momentum"] > 0 else None, "grad_avg" if group["centered"] else None)


def _native_coefficients(group: Mapping[str, Any], state: Mapping[str, Any], lr: float, step: float) -> list[float]:
    alpha, momentum = group["alpha"], group["momentum"]
    return [alpha, 1 - alpha, group["eps"], -lr, float(group["centered"]), float(momentum > 0), momentum]


class RMSprop(DanluOptimizer):
    r"""RMSprop (Hinton, 2012), the ``torch.optim.RMSprop`` formula, with momentum and centering.

    .. math::

        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2, \qquad
        \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t \ \text{(centered)}, \qquad
        s_t = \sqrt{v_t - \bar g_t^2} + \epsilon \ \text{(centered) or} \ \sqrt{v_t} + \epsilon

    then :math:`b_t = \mu b_{t-1} + g_t / s_t` and :math:`\theta_t = \theta_{t-1} - \eta b_t` with
    momentum :math:`\mu > 0`, else :math:`\theta_t = \theta_{t-1} - \eta\, g_t / s_t`.

    Args:
        params: tensors, parameter groups or ``(name, tensor)`` pairs.
        lr: learning rate :math:`\eta`.
        alpha: smoothing constant :math:`\alpha \ge 0`.
        eps: :math:`\epsilon \ge 0`, added to the square root.
        momentum: :math:`\mu \ge 0`.
        centered: normalize by the estimated variance instead of the second moment (Graves, 2013).
        foreach: ``False`` runs the per-tensor reference loop.
        state_dtype: dtype of the state and the arithmetic (default: float32 for 16-bit parameters, else theirs).
        stochastic_rounding: round bfloat16 parameter writes stochastically (unbiased; see ``danlu._precision``).

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = danlu.RMSprop([w], lr=0.1, alpha=0.0, eps=0.0)
        >>> w.grad = torch.tensor([-4.0]); _ = opt.step()
        >>> w.detach()
        tensor([1.1000])
    """

    supports_complex = True  # updated as (real, imaginary) pairs, as torch.optim does

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum, centered=centered)
        super().__init__(params, defaults, foreach=foreach, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)

    def _check_hyperparameters(self, options: Mapping[str, Any]) -> None:
        super()._check_hyperparameters(options)
        check_number("alpha", options["alpha"], low=0.0)
        check_number("eps", options["eps"], low=0.0)
        check_number("momentum", options["momentum"], low=0.0)
        check_bool("centered", options["centered"])

    def _init_state(self, p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
        state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["momentum"] > 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["centered"]:
            state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    native: ClassVar[NativeSpec | None] = NativeSpec(Kernel.RMSPROP, _native_state_keys, _native_coefficients)
    """The native kernel (see ``danlu._native_spec``)."""

    def _update_single(
        self, group: Mapping[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, step: float
    ) -> Tensor:
        alpha = group["alpha"]
        square_avg = state["square_avg"]
        square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        if group["centered"]:
            grad_avg = state["grad_avg"]
            grad_avg.lerp_(grad, 1 - alpha)
            avg = square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg.add_(group["eps"])
        if group["momentum"] > 0:
            buf = state["momentum_buffer"]
            buf.mul_(group["momentum"]).addcdiv_(grad, avg)
            return buf.mul(-lr)
        return grad.div(avg).mul_(-lr)

    def _update_foreach(
        self,
        group: Mapping[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lrs: list[float],
        steps: list[float],
    ) -> list[Tensor]:
        alpha = group["alpha"]
        square_avgs = [s["square_avg"] for s in states]
        torch._foreach_mul_(square_avgs, alpha)
        torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - alpha)
        if group["centered"]:
            grad_avgs = [s["grad_avg"] for s in states]
            torch._foreach_lerp_(grad_avgs, grads, 1 - alpha)
            avg = torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(square_avgs)
        torch._foreach_add_(avg, group["eps"])
        neg_lrs = [-lr for lr in lrs]
        if group["momentum"] > 0:
            bufs = [s["momentum_buffer"] for s in states]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_addcdiv_(bufs, grads, avg)
            return torch._foreach_mul(bufs, neg_lrs)
        updates = torch._foreach_div(grads, avg)
        torch._foreach_mul_(updates, neg_lrs)
        return updates
