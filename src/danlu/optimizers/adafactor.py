"""AdaFactor with every option of bert4keras' AdaFactor."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from danlu._distributed import zeros_reduced
from danlu._native_spec import Kernel, Layout, NativeSpec
from danlu._validate import check_bool, check_int, check_number, check_optional_number, check_patterns
from danlu.base import DanluOptimizer, ParamsT
from danlu.derivations._base import matches_any

__all__ = ["Adafactor", "factored_axes"]


def factored_axes(shape: tuple[int, ...], min_dim_size_to_factor: int) -> tuple[int, int] | None:
    """The axes (largest, second largest) over which a tensor's second moment is factored, or None.

    As bert4keras' ``factored_shape``: tensors with fewer than two dimensions, or whose second
    largest dimension is below ``min_dim_size_to_factor``, are not factored. Ties keep the lower
    axis first, so a (20, 3, 17) tensor factors over axes 0 and 2.
    """
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda axis: shape[axis])
    largest, second = order[-1], order[-2]
    if shape[second] < min_dim_size_to_factor:
        return None
    return largest, second


def _rms(x: Tensor) -> Tensor:
    return x.square().mean().sqrt()


def _native_layout(group: Mapping[str, Any], p: Tensor, state: dict[str, Any], name: str | None) -> Layout | None:
    """Slots: the statistic over axis 1, the one over axis 0, v (unfactored), the momentum; shape (rows, cols)."""
    axes = factored_axes(tuple(p.shape), group["min_dim_size_to_factor"])
    keys: tuple[str | None, ...]
    if axes is None:
        keys, shape, row_is_a1 = (None, None, "exp_avg_sq"), (p.numel(), 0), 0.0
    elif p.dim() == 2:
        largest = axes[0]
        row_first = ("exp_avg_sq_row", "exp_avg_sq_col") if largest == 1 else ("exp_avg_sq_col", "exp_avg_sq_row")
        keys, shape, row_is_a1 = (*row_first, None), (p.shape[0], p.shape[1]), float(largest == 1)
    else:
        return None
    keys = (*keys, "exp_avg" if group["beta1"] > 0 else None)
    patterns = group["exclude_from_parameter_scale"]
    scaled = group["multiply_by_parameter_scale"] and not (patterns and matches_any(tuple(patterns), name or ""))
    states = tuple(state.get(k) if k is not None else None for k in keys)
    return Layout(keys, states, shape, {7: float(scaled), 9: row_is_a1})


def _native_coefficients(group: Mapping[str, Any], state: Mapping[str, Any], lr: float, step: float) -> list[float]:
    beta2 = 1.0 - step**-0.8 if group["beta2"] is None else group["beta2"]
    clip = group["clipping_threshold"]
    beta1 = group["beta1"]
    return [beta2, 1 - beta2, group["eps1"], group["eps2"], float(clip) if clip is not None else 0.0, beta1, 1 - beta1, 0.0, -lr, 0.0]


class Adafactor(DanluOptimizer):
    r"""AdaFactor (Shazeer & Stern, 2018), with bert4keras' options.

    For a tensor factored over its two largest axes (rows :math:`r`, columns :math:`c`, see
    :func:`factored_axes`), the second moment is kept as its row and column means:

    .. math::

        R_t = \hat\beta_{2,t} R_{t-1} + (1-\hat\beta_{2,t})\, \operatorname{mean}_c(g_t^2 + \epsilon_1),
        \qquad C_t = \hat\beta_{2,t} C_{t-1} + (1-\hat\beta_{2,t})\, \operatorname{mean}_r(g_t^2 + \epsilon_1),

        \hat v_t = R_t C_t / \operatorname{mean}_r(R_t)

    (a plain moving average :math:`\hat v_t` for other tensors). Then

    .. math::

        u_t = \frac{g_t}{\sqrt{\hat v_t + \epsilon_1}}, \qquad
        u_t \leftarrow \frac{u_t}{\max(1, \operatorname{RMS}(u_t)/d)}, \qquad
        m_t = \beta_1 m_{t-1} + (1-\beta_1) u_t \ (\beta_1 > 0),

        \theta_t = \theta_{t-1} - \eta_t \max(\operatorname{RMS}(\theta_{t-1}), \epsilon_2)\, m_t

    with :math:`\hat\beta_{2,t} = 1 - t^{-0.8}` when ``beta2=None``, the relative step
    :math:`\eta_t = \min(1/\sqrt t, 10^{-2})` when ``lr=None`` (times 0.05 when
    ``multiply_by_parameter_scale=False``), clipping threshold :math:`d`, and the parameter scale
    :math:`\max(\operatorname{RMS}(\theta), \epsilon_2)` unless disabled or the tensor's name matches
    ``exclude_from_parameter_scale``. As in bert4keras, :math:`\epsilon_1` is added to
    :math:`g^2` and again under the square root. The state of a factored tensor is O(rows + cols)
    (plus the full-size momentum when ``beta1 > 0``).

    For 16-bit parameters the update is computed, and the second-moment state kept, in float32.

    Args:
        params: tensors, parameter groups or ``(name, tensor)`` pairs.
        lr: learning rate, or ``None`` for the relative step.
        beta1: momentum on the update, in [0, 1); 0 keeps no momentum.
        beta2: second-moment decay in [0, 1), or ``None`` for :math:`1 - t^{-0.8}`.
        eps1: :math:`\epsilon_1 \ge 0`.
        eps2: :math:`\epsilon_2 \ge 0`, the floor of the parameter scale.
        multiply_by_parameter_scale: scale updates by the parameter's RMS.
        clipping_threshold: :math:`d > 0`, or ``None`` for no update clipping.
        min_dim_size_to_factor: factor tensors whose second largest dimension is at least this.
        exclude_from_parameter_scale: regular expressions of parameter names that get no parameter scale.
        foreach: ``False`` runs the per-tensor reference loop.
        state_dtype: dtype of the state and the arithmetic (default: float32 for 16-bit parameters, else theirs).
        stochastic_rounding: round bfloat16 parameter writes stochastically (unbiased; see ``danlu._precision``).

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.ones(256, 128))
        >>> opt = danlu.Adafactor([w], lr=None)
        >>> w.grad = torch.ones(256, 128); _ = opt.step()
        >>> sorted(k for k in opt.state[w])
        ['exp_avg_sq_col', 'exp_avg_sq_row', 'step']
        >>> round(w[0, 0].item(), 4)   # relative step 1e-2 times the parameter RMS 1.0
        0.99
    """

    supports_complex = False  # factoring the (real, imaginary) view would factor another shape than the parameter's

    def __init__(
        self,
        params: ParamsT,
        lr: float | None = 1e-3,
        beta1: float = 0.0,
        beta2: float | None = None,
        eps1: float = 1e-30,
        eps2: float = 1e-3,
        multiply_by_parameter_scale: bool = True,
        clipping_threshold: float | None = 1.0,
        min_dim_size_to_factor: int = 128,
        exclude_from_parameter_scale: Any = (),
        *,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps1=eps1,
            eps2=eps2,
            multiply_by_parameter_scale=multiply_by_parameter_scale,
            clipping_threshold=clipping_threshold,
            min_dim_size_to_factor=min_dim_size_to_factor,
            exclude_from_parameter_scale=exclude_from_parameter_scale,
        )
        super().__init__(params, defaults, foreach=foreach, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)
        for group in self.param_groups:
            if group["exclude_from_parameter_scale"] and "param_names" not in group:
                raise ValueError(
                    "exclude_from_parameter_scale matches parameter names, but this optimizer was built without names: "
                    "pass model.named_parameters()"
                )

    def _check_hyperparameters(self, options: Mapping[str, Any]) -> None:
        check_optional_number("lr", options["lr"], low=0.0)
        check_number("beta1", options["beta1"], low=0.0, high=1.0, high_open=True)
        check_optional_number("beta2", options["beta2"], low=0.0, high=1.0, high_open=True)
        check_number("eps1", options["eps1"], low=0.0)
        check_number("eps2", options["eps2"], low=0.0)
        check_bool("multiply_by_parameter_scale", options["multiply_by_parameter_scale"])
        check_optional_number("clipping_threshold", options["clipping_threshold"], low=0.0, low_open=True)
        check_int("min_dim_size_to_factor", options["min_dim_size_to_factor"], low=0)

    def _validate_group(self, group: dict[str, Any]) -> None:
        group["exclude_from_parameter_scale"] = check_patterns(
            "exclude_from_parameter_scale", group["exclude_from_parameter_scale"]
        )
        super()._validate_group(group)

    @staticmethod
    def _state_dtype(p: Tensor) -> torch.dtype:
        return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype

    def _init_state(self, p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
        dtype = self._state_dtype(p)
        if group["beta1"] > 0:
            state["exp_avg"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        axes = factored_axes(tuple(p.shape), group["min_dim_size_to_factor"])
        if axes is None:
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
            return
        largest, second = axes
        row_shape, col_shape = list(p.shape), list(p.shape)
        row_shape[largest] = 1
        col_shape[second] = 1
        state["exp_avg_sq_row"] = zeros_reduced(p, row_shape, dtype)  # a DTensor under FSDP2
        state["exp_avg_sq_col"] = zeros_reduced(p, col_shape, dtype)

    def _effective_lr(self, group: Mapping[str, Any], state: Mapping[str, Any], step: float) -> float:
        if isinstance(step, Tensor):  # traced: tensor ops of the step, the lr as it is
            if group["lr"] is not None:
                return group["lr"]
            relative: Any = torch.clamp(step.rsqrt(), max=1e-2)
            return relative if group["multiply_by_parameter_scale"] else relative * 0.05
        if group["lr"] is not None:
            return float(group["lr"])
        relative = min(1.0 / math.sqrt(step), 1e-2)
        return relative if group["multiply_by_parameter_scale"] else relative * 0.05

    def _parameter_scaled(self, group: Mapping[str, Any], p: Tensor) -> bool:
        if not group["multiply_by_parameter_scale"]:
            return False
        patterns = group["exclude_from_parameter_scale"]
        return not (patterns and matches_any(tuple(patterns), self._param_name(group, p) or ""))

    native: ClassVar[NativeSpec | None] = NativeSpec(
        Kernel.ADAFACTOR, lambda group: (), _native_coefficients, layout=_native_layout, accumulate=False, adapt=False
    )
    """The native kernel (see ``danlu._native_spec``): its own pass structure, 2-D or unfactored tensors."""

    def _update_single(
        self, group: Mapping[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, step: float
    ) -> Tensor:
        dtype = self._state_dtype(p)
        g = grad.to(dtype)
        eps1 = group["eps1"]
        beta2 = 1.0 - step**-0.8 if group["beta2"] is None else group["beta2"]
        g2 = g.square().add_(eps1)
        if "exp_avg_sq" in state:
            v = _decay_add_(state["exp_avg_sq"], g2, beta2)
        else:
            largest, second = factored_axes(tuple(p.shape), group["min_dim_size_to_factor"])  # type: ignore[misc]
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            _decay_add_(row, g2.mean(dim=largest, keepdim=True), beta2)
            _decay_add_(col, g2.mean(dim=second, keepdim=True), beta2)
            v = row * col / row.mean(dim=second, keepdim=True)
        update = g / v.add(eps1).sqrt_()
        if group["clipping_threshold"] is not None:
            update.div_((_rms(update) / group["clipping_threshold"]).clamp_(min=1.0))
        if group["beta1"] > 0:
            update = state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"]).clone()
        if self._parameter_scaled(group, p):
            update.mul_(_rms(p.to(dtype)).clamp_(min=group["eps2"]))
        return update.mul_(-lr)


def _decay_add_(average: Tensor, value: Tensor, beta2: Any) -> Tensor:
    """``average = beta2 * average + (1 - beta2) * value`` in place (``beta2`` a float or, traced, a 0-dim tensor)."""
    if isinstance(beta2, Tensor):
        return average.mul_(beta2).add_(value * (1 - beta2))
    return average.mul_(beta2).add_(value, alpha=1 - beta2)
