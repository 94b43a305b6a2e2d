"""Adam, as in bert4keras (and torch.optim.Adam), with optional bias correction."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from danlu._native_spec import Kernel, NativeSpec
from danlu._validate import check_betas, check_bool, check_number
from danlu.base import DanluOptimizer, ParamsT
from danlu.optimizers._moments import init_moments, update_moments, update_moments_foreach

__all__ = ["Adam"]


def _native_coefficients(group: Mapping[str, Any], state: Mapping[str, Any], lr: float, step: float) -> list[float]:
    beta1, beta2 = group["betas"]
    correction1, sqrt_correction2 = (1 - beta1**step, math.sqrt(1 - beta2**step)) if group["bias_correction"] else (1.0, 1.0)
    return [1 - beta1, beta2, 1 - beta2, sqrt_correction2, group["eps"], -lr / correction1]


class Adam(DanluOptimizer):
    r"""Adam (Kingma & Ba, 2015), the update of bert4keras' ``Adam``.

    .. math::

        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,

        \hat m_t = \frac{m_t}{1-\beta_1^t}, \qquad \hat v_t = \frac{v_t}{1-\beta_2^t}, \qquad
        \theta_t = \theta_{t-1} - \eta\, \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}

    With ``bias_correction=False``, :math:`\hat m_t = m_t` and :math:`\hat v_t = v_t`: the update of
    BERT's ``AdamWeightDecayOptimizer`` before its weight decay. ``epsilon`` sits outside the square
    root, as in ``torch.optim.Adam``; the default ``eps=1e-6`` is bert4keras'.

    Args:
        params: tensors, parameter groups or ``(name, tensor)`` pairs.
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon \ge 0`.
        bias_correction: divide the moments by :math:`1-\beta^t`.
        foreach: ``False`` runs the per-tensor reference loop.
        state_dtype: dtype of the state and the arithmetic (default: float32 for 16-bit parameters, else theirs).
        stochastic_rounding: round bfloat16 parameter writes stochastically (unbiased; see ``danlu._precision``).

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> opt = danlu.Adam([w], lr=0.1)
        >>> w.grad = torch.tensor([0.5, -2.0]); _ = opt.step()   # first step: -lr * sign(g)
        >>> w.detach()
        tensor([0.9000, 1.1000])
    """

    supports_complex = True  # updated as (real, imaginary) pairs, as torch.optim does

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        bias_correction: bool = True,
        *,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, bias_correction=bias_correction)
        super().__init__(params, defaults, foreach=foreach, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)

    def _check_hyperparameters(self, options: Mapping[str, Any]) -> None:
        super()._check_hyperparameters(options)
        check_betas("betas", options["betas"])
        check_number("eps", options["eps"], low=0.0)
        check_bool("bias_correction", options["bias_correction"])

    def _init_state(self, p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
        init_moments(p, state)

    def _corrections(self, group: Mapping[str, Any], step: Any) -> tuple[Any, Any]:
        """Return (1 - beta1^t, sqrt(1 - beta2^t)), or (1, 1) without bias correction (tensors for a tensor step)."""
        if not group["bias_correction"]:
            return 1.0, 1.0
        beta1, beta2 = group["betas"]
        if isinstance(step, Tensor):
            return 1 - beta1**step, (1 - beta2**step).sqrt()
        return 1 - beta1**step, math.sqrt(1 - beta2**step)

    native: ClassVar[NativeSpec | None] = NativeSpec(
        Kernel.ADAM, lambda group: ("exp_avg", "exp_avg_sq"), _native_coefficients, torch_fused=True
    )
    """The native kernel (see ``danlu._native_spec``)."""

    def _update_single(
        self, group: Mapping[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, step: float
    ) -> Tensor:
        exp_avg, exp_avg_sq = update_moments(state, grad, group["betas"])
        correction1, sqrt_correction2 = self._corrections(group, step)
        denom = exp_avg_sq.sqrt().div_(sqrt_correction2).add_(group["eps"])
        return exp_avg.div(denom).mul_(-lr / correction1)

    def _update_foreach(
        self,
        group: Mapping[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lrs: list[float],
        steps: list[float],
    ) -> list[Tensor]:
        exp_avgs, exp_avg_sqs = update_moments_foreach(states, grads, group["betas"])
        corrections = [self._corrections(group, t) for t in steps]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [c[1] for c in corrections])
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(updates, [-lr / c[0] for lr, c in zip(lrs, corrections)])
        return updates
