"""RAdam (Liu et al.), the torch.optim.RAdam formula."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from danlu._native_spec import Kernel, NativeSpec
from danlu._validate import check_betas, check_number
from danlu.base import DanluOptimizer, ParamsT
from danlu.optimizers._moments import init_moments, update_moments, update_moments_foreach

__all__ = ["RAdam"]


def _native_coefficients(group: Mapping[str, Any], state: Mapping[str, Any], lr: float, step: float) -> list[float]:
    beta1, beta2 = group["betas"]
    scale = -lr / (1 - beta1**step)
    adaptive = RAdam._rectification(group, step)
    rectified = adaptive is not None
    return [1 - beta1, beta2, 1 - beta2, float(rectified), group["eps"], scale, scale * adaptive if rectified else 0.0]


class RAdam(DanluOptimizer):
    r"""Rectified Adam (Liu et al., 2020), the ``torch.optim.RAdam`` formula.

    With :math:`\rho_\infty = 2/(1-\beta_2) - 1` and
    :math:`\rho_t = \rho_\infty - 2 t \beta_2^t / (1-\beta_2^t)`:

    .. math::

        \hat m_t = \frac{m_t}{1-\beta_1^t}, \qquad
        \theta_t = \theta_{t-1} - \eta\, \hat m_t\, r_t \frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t} + \epsilon}
        \ \text{ if } \rho_t > 5, \ \text{ else } \ \theta_{t-1} - \eta\, \hat m_t,

        r_t = \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}}

    (``epsilon`` is added to :math:`\sqrt{v_t}` before the bias correction, as in torch.)

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
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = danlu.RAdam([w], lr=0.1)
        >>> w.grad = torch.tensor([3.0]); _ = opt.step()   # rho_1 < 5: an SGD-with-momentum step
        >>> round(w.item(), 4)
        0.7
    """

    supports_complex = True  # updated as (real, imaginary) pairs, as torch.optim does

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps), foreach=foreach, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)

    def _check_hyperparameters(self, options: Mapping[str, Any]) -> None:
        super()._check_hyperparameters(options)
        check_betas("betas", options["betas"])
        check_number("eps", options["eps"], low=0.0)

    def _init_state(self, p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
        init_moments(p, state)

    @staticmethod
    def _rectification(group: Mapping[str, Any], step: float) -> float | None:
        """sqrt(1 - beta2^t) * r_t when the variance is tractable (rho_t > 5), else None."""
        beta2 = group["betas"][1]
        correction2 = 1 - beta2**step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / correction2
        if rho_t <= 5.0:
            return None
        rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        return rect * math.sqrt(correction2)

    @staticmethod
    def _traced_rectification(group: Mapping[str, Any], step: Tensor) -> tuple[Tensor, Tensor]:
        """For a tensor step: (whether rho_t > 5, sqrt(1 - beta2^t) * r_t where it is, else 0)."""
        beta2 = group["betas"][1]
        correction2 = 1 - beta2**step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / correction2
        rectified = rho_t > 5.0
        ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        return rectified, torch.where(rectified, ratio.clamp(min=0).sqrt() * correction2.sqrt(), 0.0)

    native: ClassVar[NativeSpec | None] = NativeSpec(Kernel.RADAM, lambda group: ("exp_avg", "exp_avg_sq"), _native_coefficients)
    """The native kernel (see ``danlu._native_spec``)."""

    def _update_single(
        self, group: Mapping[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, step: float
    ) -> Tensor:
        beta1 = group["betas"][0]
        exp_avg, exp_avg_sq = update_moments(state, grad, group["betas"])
        scale = -lr / (1 - beta1**step)
        if isinstance(step, Tensor):
            rectified, traced_adaptive = self._traced_rectification(group, step)
            rectified_update = exp_avg.div(exp_avg_sq.sqrt().add_(group["eps"])).mul_(scale * traced_adaptive)
            return torch.where(rectified, rectified_update, exp_avg.mul(scale))
        adaptive = self._rectification(group, step)
        if adaptive is None:
            return exp_avg.mul(scale)
        denom = exp_avg_sq.sqrt().add_(group["eps"])
        return exp_avg.div(denom).mul_(scale * adaptive)

    def _update_foreach(
        self,
        group: Mapping[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lrs: list[float],
        steps: list[float],
    ) -> list[Tensor]:
        if isinstance(steps[0], Tensor):  # traced: branch-free per tensor
            return [self._update_single(group, p, g, s, lr, t) for p, g, s, lr, t in zip(params, grads, states, lrs, steps)]
        beta1 = group["betas"][0]
        exp_avgs, exp_avg_sqs = update_moments_foreach(states, grads, group["betas"])
        scales = [-lr / (1 - beta1**t) for lr, t in zip(lrs, steps)]
        adaptives = [self._rectification(group, t) for t in steps]
        rectified = [i for i, a in enumerate(adaptives) if a is not None]
        updates = torch._foreach_mul(exp_avgs, scales)
        if rectified:
            denom = torch._foreach_sqrt([exp_avg_sqs[i] for i in rectified])
            torch._foreach_add_(denom, group["eps"])
            chosen = [updates[i] for i in rectified]
            torch._foreach_div_(chosen, denom)
            torch._foreach_mul_(chosen, [adaptives[i] for i in rectified])  # type: ignore[misc]
        return updates
