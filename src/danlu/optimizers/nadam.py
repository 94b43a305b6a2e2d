"""NAdam (Dozat), the torch.optim.NAdam formula."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from danlu import _fused
from danlu._native_spec import Kernel, NativeSpec
from danlu._validate import check_betas, check_number
from danlu.base import DanluOptimizer, ParamsT
from danlu.optimizers._moments import init_moments, update_moments, update_moments_foreach

__all__ = ["NAdam"]


def _native_rows(group: Mapping[str, Any], states: list[dict[str, Any]], lrs: list[float], steps: list[float]) -> Any:
    """The kernel rows of many tensors (as ``NAdam._coefficients``), every ``mu_product`` advanced in one call."""
    import numpy as np

    beta1, beta2 = group["betas"]
    psi = group["momentum_decay"]
    products = [s["mu_product"] for s in states]
    distinct = sorted(set(steps))  # one step count in a group, except after parameters were added
    by_step = {t: (beta1 * (1.0 - 0.5 * 0.96 ** (t * psi)), beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))) for t in distinct}
    if len(distinct) == 1:
        (mu, mu_next), sqrt_correction2 = by_step[distinct[0]], (1 - beta2 ** distinct[0]) ** 0.5
        factors: float | list[float] = mu
    else:
        mu = np.array([by_step[t][0] for t in steps])
        mu_next = np.array([by_step[t][1] for t in steps])
        sqrt_correction2 = np.array([(1 - beta2**t) ** 0.5 for t in steps])
        factors = mu.tolist()
    mu_product = _fused.scale_scalars(products, factors)  # every product advanced in one native call
    if mu_product is None:
        torch._foreach_mul_(products, factors)
        mu_product = torch.stack(products).numpy() if len(products) > 1 else np.array([float(products[0])])
    lr = np.array(lrs, dtype=np.float64)
    rows = np.zeros((len(states), 7))
    rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 4] = 1 - beta1, beta2, 1 - beta2, group["eps"]
    rows[:, 3] = sqrt_correction2
    rows[:, 5] = -lr * (1.0 - mu) / (1.0 - mu_product)
    rows[:, 6] = -lr * mu_next / (1.0 - mu_product * mu_next)
    return rows


def _native_coefficients(group: Mapping[str, Any], state: Mapping[str, Any], lr: float, step: float) -> list[float]:
    return list(_native_rows(group, [dict(state)], [lr], [step])[0])


class NAdam(DanluOptimizer):
    r"""Nesterov-accelerated Adam (Dozat, 2016), the ``torch.optim.NAdam`` formula.

    With the momentum schedule :math:`\mu_t = \beta_1 (1 - \tfrac12 \cdot 0.96^{t\psi})`
    (:math:`\psi` = ``momentum_decay``) and :math:`\Pi_t = \prod_{i \le t} \mu_i`:

    .. math::

        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,
        \qquad d_t = \sqrt{v_t / (1-\beta_2^t)} + \epsilon

        \theta_t = \theta_{t-1} - \eta \frac{1-\mu_t}{1-\Pi_t} \frac{g_t}{d_t}
                   - \eta \frac{\mu_{t+1}}{1-\Pi_t \mu_{t+1}} \frac{m_t}{d_t}

    Args:
        params: tensors, parameter groups or ``(name, tensor)`` pairs.
        lr: learning rate :math:`\eta`.
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon \ge 0`.
        momentum_decay: :math:`\psi \ge 0`.
        foreach: ``False`` runs the per-tensor reference loop.
        state_dtype: dtype of the state and the arithmetic (default: float32 for 16-bit parameters, else theirs).
        stochastic_rounding: round bfloat16 parameter writes stochastically (unbiased; see ``danlu._precision``).

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = danlu.NAdam([w], lr=0.1)
        >>> w.grad = torch.tensor([1.0]); _ = opt.step()   # the same number as torch.optim.NAdam
        >>> round(w.item(), 4)
        0.8944
    """

    supports_complex = True  # updated as (real, imaginary) pairs, as torch.optim does

    def __init__(
        self,
        params: ParamsT,
        lr: float = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        momentum_decay: float = 4e-3,
        *,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum_decay=momentum_decay)
        super().__init__(params, defaults, foreach=foreach, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)

    def _check_hyperparameters(self, options: Mapping[str, Any]) -> None:
        super()._check_hyperparameters(options)
        check_betas("betas", options["betas"])
        check_number("eps", options["eps"], low=0.0)
        check_number("momentum_decay", options["momentum_decay"], low=0.0)

    def _init_state(self, p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
        state["mu_product"] = torch.ones((), dtype=torch.float64)
        init_moments(p, state)

    def _coefficients(self, group: Mapping[str, Any], state: dict[str, Any], lr: Any, step: Any) -> tuple[Any, Any, Any]:
        """Advance mu_product; return (grad coefficient, momentum coefficient, sqrt(1 - beta2^t)) (tensors for a tensor step)."""
        beta1, beta2 = group["betas"]
        psi = group["momentum_decay"]
        mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * psi))
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
        state["mu_product"].mul_(mu)
        mu_product = state["mu_product"] if isinstance(step, Tensor) else float(state["mu_product"])
        grad_coef = -lr * (1.0 - mu) / (1.0 - mu_product)
        momentum_coef = -lr * mu_next / (1.0 - mu_product * mu_next)
        return grad_coef, momentum_coef, (1 - beta2**step) ** 0.5

    native: ClassVar[NativeSpec | None] = NativeSpec(
        Kernel.NADAM, lambda group: ("exp_avg", "exp_avg_sq"), _native_coefficients, rows=_native_rows
    )
    """The native kernel (see ``danlu._native_spec``): the rows advance ``mu_product`` as the reference does."""

    def _update_single(
        self, group: Mapping[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, step: float
    ) -> Tensor:
        exp_avg, exp_avg_sq = update_moments(state, grad, group["betas"])
        grad_coef, momentum_coef, sqrt_correction2 = self._coefficients(group, state, lr, step)
        denom = exp_avg_sq.sqrt().div_(sqrt_correction2).add_(group["eps"])
        update = grad.div(denom).mul_(grad_coef)
        return update.addcdiv_(exp_avg, denom, value=momentum_coef)

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
        coefficients = [self._coefficients(group, s, lr, t) for s, lr, t in zip(states, lrs, steps)]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [c[2] for c in coefficients])
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(grads, denom)
        torch._foreach_mul_(updates, [c[0] for c in coefficients])
        momentum_coefs = [c[1] for c in coefficients]
        if isinstance(momentum_coefs[0], Tensor):  # traced: addcdiv takes no tensor scalars
            torch._foreach_add_(updates, torch._foreach_mul(torch._foreach_div(exp_avgs, denom), momentum_coefs))
        else:
            torch._foreach_addcdiv_(updates, exp_avgs, denom, momentum_coefs)
        return updates
