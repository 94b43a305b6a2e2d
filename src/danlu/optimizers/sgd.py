"""SGD with optional heavy-ball or Nesterov momentum."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from danlu._distributed import foreach_copy_
from danlu._native_spec import Kernel, NativeSpec
from danlu._validate import check_bool, check_number
from danlu.base import DanluOptimizer, ParamsT

__all__ = ["SGD"]


def _native_state_keys(group: Mapping[str, Any]) -> tuple[str | None]:
    return ("momentum_buffer" if group["momentum"] != 0 else None,)


def _native_coefficients(group: Mapping[str, Any], state: Mapping[str, Any], lr: float, step: float) -> list[float]:
    momentum = group["momentum"]
    return [float(momentum != 0), momentum, 1 - group["dampening"], float(group["nesterov"]), float(step == 1), -lr]


class SGD(DanluOptimizer):
    r"""Stochastic gradient descent, plain (SGD), with momentum (SGDM) or Nesterov momentum (NAG).

    With momentum :math:`\mu > 0` and dampening :math:`\tau` (the ``torch.optim.SGD`` formula;
    the buffer starts as the first gradient, undampened):

    .. math::

        b_1 = g_1, \qquad b_t = \mu b_{t-1} + (1 - \tau) g_t, \qquad
        d_t = g_t + \mu b_t \ \text{(Nesterov)} \ \text{or} \ b_t, \qquad
        \theta_t = \theta_{t-1} - \eta\, d_t

    Args:
        params: tensors, parameter groups or ``(name, tensor)`` pairs.
        lr: learning rate :math:`\eta` (required, as in torch).
        momentum: :math:`\mu \ge 0`.
        dampening: :math:`\tau \ge 0`.
        nesterov: Nesterov momentum (Sutskever et al., 2013); needs ``momentum > 0`` and ``dampening == 0``.
        foreach: ``False`` runs the per-tensor reference loop.
        state_dtype: dtype of the state and the arithmetic (default: float32 for 16-bit parameters, else theirs).
        stochastic_rounding: round bfloat16 parameter writes stochastically (unbiased; see ``danlu._precision``).

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
        >>> opt = danlu.SGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.tensor([1.0, 1.0]); _ = opt.step()
        >>> w.detach()
        tensor([ 0.9000, -2.1000])
    """

    supports_complex = True  # updated as (real, imaginary) pairs, as torch.optim does

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        *,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov)
        super().__init__(params, defaults, foreach=foreach, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)

    def _check_hyperparameters(self, options: Mapping[str, Any]) -> None:
        super()._check_hyperparameters(options)
        momentum = check_number("momentum", options["momentum"], low=0.0)
        dampening = check_number("dampening", options["dampening"], low=0.0)
        if check_bool("nesterov", options["nesterov"]) and (momentum <= 0 or dampening != 0):
            raise ValueError(
                f"Invalid nesterov: True needs momentum > 0 and dampening == 0 (got momentum={momentum!r}, dampening={dampening!r})"
            )

    def _init_state(self, p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
        if group["momentum"] != 0:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    native: ClassVar[NativeSpec | None] = NativeSpec(Kernel.SGD, _native_state_keys, _native_coefficients)
    """The native kernel (see ``danlu._native_spec``): momentum buffer in slot 0."""

    def _update_single(
        self, group: Mapping[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, step: float
    ) -> Tensor:
        momentum = group["momentum"]
        direction = grad
        if momentum != 0:
            buf = state["momentum_buffer"]
            if isinstance(step, Tensor):  # traced: the first step's copy as a select
                buf.copy_(torch.where(step == 1, grad, buf * momentum + grad * (1 - group["dampening"])))
            elif step == 1:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
            direction = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        return direction.mul(-lr)

    def _update_foreach(
        self,
        group: Mapping[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lrs: list[float],
        steps: list[float],
    ) -> list[Tensor]:
        momentum = group["momentum"]
        directions = grads
        if momentum != 0:
            bufs = [s["momentum_buffer"] for s in states]
            if isinstance(steps[0], Tensor):  # traced: the first step's copy as a select
                return [self._update_single(group, p, g, s, lr, t) for p, g, s, lr, t in zip(params, grads, states, lrs, steps)]
            first = [i for i, t in enumerate(steps) if t == 1]
            later = [i for i, t in enumerate(steps) if t != 1]
            if first:
                foreach_copy_([bufs[i] for i in first], [grads[i] for i in first])
            if later:
                later_bufs = [bufs[i] for i in later]
                torch._foreach_mul_(later_bufs, momentum)
                torch._foreach_add_(later_bufs, [grads[i] for i in later], alpha=1 - group["dampening"])
            directions = torch._foreach_add(grads, bufs, alpha=momentum) if group["nesterov"] else bufs
        return torch._foreach_mul(directions, [-lr for lr in lrs])
