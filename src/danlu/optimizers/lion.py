"""Lion (Chen et al.)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from danlu._native_spec import Kernel, NativeSpec
from danlu._validate import check_betas
from danlu.base import DanluOptimizer, ParamsT

__all__ = ["Lion"]


class Lion(DanluOptimizer):
    r"""Lion, EvoLved Sign Momentum (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms").

    .. math::

        \theta_t = \theta_{t-1} - \eta\, \operatorname{sign}\!\big(\beta_1 m_{t-1} + (1-\beta_1) g_t\big),
        \qquad m_t = \beta_2 m_{t-1} + (1-\beta_2) g_t

    Use ``extend_with_weight_decay`` for the paper's decoupled weight decay. bert4keras' defaults are
    ``(3e-4, 0.95, 0.98)``; danlu's are the paper's ``(1e-4, 0.9, 0.99)``.

    Args:
        params: tensors, parameter groups or ``(name, tensor)`` pairs.
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        foreach: ``False`` runs the per-tensor reference loop.
        state_dtype: dtype of the state and the arithmetic (default: float32 for 16-bit parameters, else theirs).
        stochastic_rounding: round bfloat16 parameter writes stochastically (unbiased; see ``danlu._precision``).

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0, 1.0]))
        >>> opt = danlu.Lion([w], lr=0.1)
        >>> w.grad = torch.tensor([0.3, 0.0, -7.0]); _ = opt.step()
        >>> w.detach()
        tensor([0.9000, 1.0000, 1.1000])
    """

    supports_complex = True  # updated as (real, imaginary) pairs, as torch.optim does

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        *,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas), foreach=foreach, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)

    def _check_hyperparameters(self, options: Mapping[str, Any]) -> None:
        super()._check_hyperparameters(options)
        check_betas("betas", options["betas"])

    def _init_state(self, p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    native: ClassVar[NativeSpec | None] = NativeSpec(
        Kernel.LION, lambda group: ("exp_avg",), lambda group, state, lr, step: [1 - group["betas"][0], 1 - group["betas"][1], -lr]
    )
    """The native kernel (see ``danlu._native_spec``)."""

    def _update_single(
        self, group: Mapping[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, step: float
    ) -> Tensor:
        beta1, beta2 = group["betas"]
        exp_avg = state["exp_avg"]
        update = exp_avg.lerp(grad, 1 - beta1).sign_().mul_(-lr)
        exp_avg.lerp_(grad, 1 - beta2)
        return update

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
        updates = torch._foreach_lerp(exp_avgs, grads, 1 - beta1)
        torch._foreach_sign_(updates)
        torch._foreach_mul_(updates, [-lr for lr in lrs])
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta2)
        return updates
