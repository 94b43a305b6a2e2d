"""AdaGrad."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from danlu._native_spec import Kernel, NativeSpec
from danlu._validate import check_number
from danlu.base import DanluOptimizer, ParamsT

__all__ = ["Adagrad"]


class Adagrad(DanluOptimizer):
    r"""AdaGrad (Duchi, Hazan & Singer, 2011), the ``torch.optim.Adagrad`` formula without lr decay.

    .. math::

        s_t = s_{t-1} + g_t^2, \qquad \theta_t = \theta_{t-1} - \eta\, \frac{g_t}{\sqrt{s_t} + \epsilon},
        \qquad s_0 = \text{initial\_accumulator\_value}

    Args:
        params: tensors, parameter groups or ``(name, tensor)`` pairs.
        lr: learning rate :math:`\eta`.
        eps: :math:`\epsilon \ge 0`, added to the square root.
        initial_accumulator_value: :math:`s_0 \ge 0`.
        foreach: ``False`` runs the per-tensor reference loop.
        state_dtype: dtype of the state and the arithmetic (default: float32 for 16-bit parameters, else theirs).
        stochastic_rounding: round bfloat16 parameter writes stochastically (unbiased; see ``danlu._precision``).

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = danlu.Adagrad([w], lr=0.5)
        >>> w.grad = torch.tensor([2.0]); _ = opt.step()
        >>> w.detach()
        tensor([0.5000])
    """

    supports_complex = True  # updated as (real, imaginary) pairs, as torch.optim does

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-2,
        eps: float = 1e-10,
        initial_accumulator_value: float = 0.0,
        *,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value)
        super().__init__(params, defaults, foreach=foreach, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)

    def _check_hyperparameters(self, options: Mapping[str, Any]) -> None:
        super()._check_hyperparameters(options)
        check_number("eps", options["eps"], low=0.0)
        check_number("initial_accumulator_value", options["initial_accumulator_value"], low=0.0)

    def _init_state(self, p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
        value = group["initial_accumulator_value"]
        initial = complex(value, value) if p.is_complex() else value  # every real number of a (real, imag) pair starts there
        state["sum"] = torch.full_like(p, initial, memory_format=torch.preserve_format)

    native: ClassVar[NativeSpec | None] = NativeSpec(
        Kernel.ADAGRAD, lambda group: ("sum",), lambda group, state, lr, step: [-lr, group["eps"]]
    )
    """The native kernel (see ``danlu._native_spec``)."""

    def _update_single(
        self, group: Mapping[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, step: float
    ) -> Tensor:
        total = state["sum"]
        total.addcmul_(grad, grad, value=1)
        std = total.sqrt().add_(group["eps"])
        return grad.div(std).mul_(-lr)

    def _update_foreach(
        self,
        group: Mapping[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lrs: list[float],
        steps: list[float],
    ) -> list[Tensor]:
        sums = [s["sum"] for s in states]
        torch._foreach_addcmul_(sums, grads, grads, value=1)
        std = torch._foreach_sqrt(sums)
        torch._foreach_add_(std, group["eps"])
        updates = torch._foreach_div(grads, std)
        torch._foreach_mul_(updates, [-lr for lr in lrs])
        return updates
