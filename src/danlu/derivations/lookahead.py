"""Lookahead (``extend_with_lookahead``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from danlu._distributed import foreach_copy_
from danlu._native_spec import AfterStep, Col, Mode, Slot
from danlu._precision import copy_rounded_
from danlu._validate import check_int, check_number
from danlu.derivations._base import APPLIED_STEPS, Derivation, by_device_and_dtype, wide_dtype

if TYPE_CHECKING:
    from danlu._host import DerivationHost

__all__ = ["Lookahead"]

SLOW = "lookahead.slow"


class Lookahead(Derivation):
    r"""Lookahead (Zhang, Lucas, Hinton & Ba, 2019): fast weights explore, slow weights follow.

    The slow weights :math:`\phi` start as the parameters (at the first step). After every
    :math:`k`-th applied step of the base optimizer:

    .. math::

        \phi \leftarrow \phi + \alpha (\theta - \phi), \qquad \theta \leftarrow \phi

    with :math:`k` = ``steps_per_slow_update`` and :math:`\alpha` = ``slow_step_size``, as in the paper,
    tensorflow-addons and optax. (bert4keras' tf.keras version starts :math:`\phi` at zero and syncs at
    calls 1, k+1, ..., which multiplies the weights by :math:`\alpha` at the first call.) The slow
    weights live in ``state[p]["lookahead.slow"]``.

    Keyword arguments: ``steps_per_slow_update=5`` (an int >= 1), ``slow_step_size=0.5`` (in (0, 1]).

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = danlu.extend_with_lookahead(danlu.SGD)([w], lr=1.0, steps_per_slow_update=2, slow_step_size=0.5)
        >>> for _ in range(2):   # fast weights: -1, -2; then slow = 0 + 0.5 * (-2 - 0) and w = slow
        ...     w.grad = torch.ones(1); _ = opt.step()
        >>> w.item()
        -1.0
    """

    name = "lookahead"
    title = "Lookahead"
    defaults = {"steps_per_slow_update": 5, "slow_step_size": 0.5}
    state_keys = (SLOW,)
    required_state = (SLOW,)
    native = AfterStep(
        Mode.SYNC,
        Slot.SLOW,
        Col.SLOW_STEP,
        SLOW,
        weight=lambda group: group["slow_step_size"],
        active=lambda group: (int(group[APPLIED_STEPS]) + 1) % group["steps_per_slow_update"] == 0,
    )
    """Fused: the sync of the steps that end a cycle, in the update's pass."""

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        checked: dict[str, Any] = {}
        if "steps_per_slow_update" in options:
            checked["steps_per_slow_update"] = check_int("steps_per_slow_update", options["steps_per_slow_update"], low=1)
        if "slow_step_size" in options:
            checked["slow_step_size"] = check_number(
                "slow_step_size", options["slow_step_size"], low=0.0, low_open=True, high=1.0
            )
        return checked

    def prepare(self, host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        if torch.compiler.is_compiling():
            self._traced_prepare(host, group, params)
            return
        first = int(group[APPLIED_STEPS]) == 0  # slow weights made before the first step (init_state) are refreshed
        for p in params:
            state = host.state[p]
            if SLOW not in state:
                state[SLOW] = _slow_copy(group, p)
            elif first:
                state[SLOW].copy_(p)

    def _traced_prepare(self, host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        first = group[APPLIED_STEPS] == 0
        for p in params:
            state = host.state[p]
            if SLOW not in state:
                state[SLOW] = _slow_copy(group, p)
            else:
                state[SLOW].copy_(torch.where(first, p, state[SLOW]))

    def init_state(self, host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        for p in params:
            if SLOW not in host.state[p]:
                host.state[p][SLOW] = _slow_copy(group, p)

    def after_step(self, host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        if torch.compiler.is_compiling():
            self._traced_sync(host, group, params)
            return
        applied = int(group[APPLIED_STEPS])
        if applied % group["steps_per_slow_update"] != 0:
            return
        for bucket in by_device_and_dtype(params):
            fast = [params[i] for i in bucket]
            slow = [host.state[p][SLOW] for p in fast]
            if all(s.dtype == f.dtype for s, f in zip(slow, fast)):
                torch._foreach_lerp_(slow, fast, group["slow_step_size"])
                foreach_copy_(fast, slow)
                continue
            # wider slow weights (16-bit parameters): the parameters get them rounded once
            torch._foreach_lerp_(slow, [f.to(s.dtype) for s, f in zip(slow, fast)], group["slow_step_size"])
            if group.get("stochastic_rounding"):
                salts = [getattr(host, "_param_salt", lambda q: 0)(f) for f in fast]
                copy_rounded_(fast, slow, salts, applied)
            else:
                foreach_copy_(fast, slow)

    @staticmethod
    def _traced_sync(host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        """The sync as tensor ops: computed on every call, written where the applied count is a multiple of k."""
        sync = torch.remainder(group[APPLIED_STEPS], group["steps_per_slow_update"]) == 0
        alpha = group["slow_step_size"]
        for p in params:
            slow = host.state[p].get(SLOW)
            if slow is None:
                continue
            synced = torch.lerp(slow, p.to(slow.dtype), alpha)
            slow.copy_(torch.where(sync, synced, slow))
            p.copy_(torch.where(sync, synced.to(p.dtype), p))


def _slow_copy(group: dict[str, Any], p: Tensor) -> Tensor:
    return p.detach().to(dtype=wide_dtype(group, p), memory_format=torch.preserve_format, copy=True)
