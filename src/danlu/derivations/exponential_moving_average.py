"""Exponential moving average of the weights (``extend_with_exponential_moving_average``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from danlu._native_spec import AfterStep, Col, Mode, Slot
from danlu._validate import check_bool, check_number
from danlu.derivations._base import APPLIED_STEPS, Derivation, by_device_and_dtype, wide_dtype

if TYPE_CHECKING:
    from danlu._host import DerivationHost

__all__ = ["ExponentialMovingAverage", "EMAWeightsError"]

SHADOW = "ema.shadow"
_BACKUP = "_danlu_ema_backup"


class EMAWeightsError(ValueError, RuntimeError):
    """A call that does not fit the EMA weights' state: apply before any step, reset without apply,
    apply twice, or ``step()`` while the averaged weights are in the model.

    A ``ValueError`` (a bad call, like the other bad inputs of danlu) and a ``RuntimeError`` (the
    optimizer is in the wrong state for it), so that either ``except`` catches it. Nothing changes.
    """


class ExponentialMovingAverage(Derivation):
    r"""Keep an exponential moving average of the weights, bert4keras' ``extend_with_exponential_moving_average``.

    After every applied step (the shadow starts at zero and lives in ``state[p]["ema.shadow"]``):

    .. math::

        e_t = \mu e_{t-1} + (1-\mu)\, \theta_t

    ``optimizer.apply_ema_weights(bias_correction=True)`` writes :math:`e_t / (1-\mu^t)` (or
    :math:`e_t` without bias correction) into the parameters, keeping the training weights aside;
    ``optimizer.reset_old_weights()`` puts them back. ``with optimizer.ema_weights(): ...`` does both
    around a block (evaluation, saving the averaged model). :math:`t` counts applied steps.

    Keyword arguments: ``ema_momentum=0.999`` (in [0, 1)).

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = danlu.extend_with_exponential_moving_average(danlu.SGD)([w], lr=1.0, ema_momentum=0.5)
        >>> w.grad = torch.ones(1); _ = opt.step()   # w = -1, shadow = 0.5 * 0 + 0.5 * (-1)
        >>> with opt.ema_weights(bias_correction=False):
        ...     w.item()
        -0.5
        >>> w.item()
        -1.0
    """

    name = "ema"
    title = "ExponentialMovingAverage"
    defaults = {"ema_momentum": 0.999}
    state_keys = (SHADOW,)
    required_state = (SHADOW,)
    native = AfterStep(Mode.EMA, Slot.EMA, Col.EMA_WEIGHT, SHADOW, weight=lambda group: 1.0 - group["ema_momentum"], create=True)
    """Fused: the shadow's update, in the update's pass."""

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        if "ema_momentum" not in options:
            return {}
        return {"ema_momentum": check_number("ema_momentum", options["ema_momentum"], low=0.0, high=1.0, high_open=True)}

    def check(self, host: DerivationHost) -> None:
        if _BACKUP in host.__dict__:
            raise EMAWeightsError(
                "step() while the averaged weights are applied (apply_ema_weights()): it would train the averaged "
                "weights and reset_old_weights() would then discard the step; call reset_old_weights() first"
            )

    def init_state(self, host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        for p in params:
            self.zeros_state(host, p, SHADOW, wide_dtype(group, p))

    def after_step(self, host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        shadows = [self.zeros_state(host, p, SHADOW, wide_dtype(group, p)) for p in params]
        weight = 1.0 - group["ema_momentum"]
        for bucket in by_device_and_dtype(params):
            targets = [shadows[i] for i in bucket]
            sources = [params[i] if params[i].dtype == shadows[i].dtype else params[i].to(shadows[i].dtype) for i in bucket]
            torch._foreach_lerp_(targets, sources, weight)


def apply_ema_weights(self: DerivationHost, bias_correction: bool = True) -> None:
    """Swap the averaged weights into the parameters (divided by ``1 - momentum**t`` with bias correction).

    The training weights are kept aside until :meth:`reset_old_weights`. Raises
    :class:`EMAWeightsError` (a ``ValueError`` and a ``RuntimeError``) before any applied step (there
    is no average yet) or when the averaged weights are already in; nothing changes then.
    """
    check_bool("bias_correction", bias_correction)
    if _BACKUP in self.__dict__:
        raise EMAWeightsError("apply_ema_weights(): the averaged weights are already applied; call reset_old_weights() first")
    if all(int(group[APPLIED_STEPS]) == 0 for group in self.param_groups):
        raise EMAWeightsError("apply_ema_weights() before any optimizer step: there are no averaged weights yet")
    backup: list[tuple[Tensor, Tensor]] = []
    with torch.no_grad():
        for group in self.param_groups:
            momentum, steps = group["ema_momentum"], int(group[APPLIED_STEPS])
            scale = 1.0 - momentum**steps if bias_correction else 1.0
            for p in group["params"]:
                shadow = self.state[p].get(SHADOW)
                if shadow is None:
                    continue
                backup.append((p, p.detach().clone(memory_format=torch.preserve_format)))
                p.copy_(shadow / scale)  # rounded once to the parameter's dtype
    self.__dict__[_BACKUP] = backup


def reset_old_weights(self: DerivationHost) -> None:
    """Put back the training weights that :meth:`apply_ema_weights` set aside."""
    backup = self.__dict__.pop(_BACKUP, None)
    if backup is None:
        raise EMAWeightsError("reset_old_weights() without a preceding apply_ema_weights()")
    with torch.no_grad():
        for p, old in backup:
            p.copy_(old)


@contextlib.contextmanager
def ema_weights(self: DerivationHost, bias_correction: bool = True) -> Iterator[None]:
    """Context manager: the averaged weights inside the block, the training weights after it."""
    apply_ema_weights(self, bias_correction)
    try:
        yield
    finally:
        reset_old_weights(self)


ExponentialMovingAverage.methods = {
    "apply_ema_weights": apply_ema_weights,
    "reset_old_weights": reset_old_weights,
    "ema_weights": ema_weights,
}
