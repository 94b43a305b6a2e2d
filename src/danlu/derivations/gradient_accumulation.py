"""Gradient accumulation (``extend_with_gradient_accumulation``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from danlu._distributed import all_reduce_mean_, sync_group
from danlu._validate import check_int
from danlu.derivations._base import CALLS, Derivation

if TYPE_CHECKING:
    from danlu._host import DerivationHost

__all__ = ["GradientAccumulation"]

BUFFER = "accum.grad"
_RESTORE = "_danlu_accum_restore"


def _buffer_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class GradientAccumulation(Derivation):
    r"""Apply one step every ``grad_accum_steps`` calls, with the mean of their gradients.

    The ``optax.MultiSteps`` semantics: calls :math:`1 \dots k-1` of each cycle only add ``p.grad``
    to a buffer (``state[p]["accum.grad"]``) and change nothing else; call :math:`k` replaces
    ``p.grad`` in place by the mean

    .. math::

        \bar g = \frac{1}{k} \sum_{i=1}^{k} g_i

    and applies one step of the base optimizer with it. Buffering calls are not steps for any
    derivation or for the base optimizer's bias correction. (bert4keras applies at calls 1, k+1,
    2k+1, ... with the gradients of the calls before, and its Adam counts every call.) The buffer of
    a 16-bit parameter is float32. ``grad_accum_steps`` must be the same in every parameter group.

    Keyword arguments: ``grad_accum_steps=2`` (an int >= 1).

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = danlu.extend_with_gradient_accumulation(danlu.Adam)([w], lr=0.1, grad_accum_steps=2)
        >>> for _ in range(4):
        ...     w.grad = torch.ones(2); _ = opt.step()
        >>> opt.param_groups[0]["calls"], opt.param_groups[0]["applied_steps"], opt.state[w]["step"].item()
        (4, 2, 2.0)
    """

    name = "gradient_accumulation"
    title = "GradientAccumulation"
    defaults = {"grad_accum_steps": 2}
    state_keys = (BUFFER,)

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        if "grad_accum_steps" not in options:
            return {}
        return {"grad_accum_steps": check_int("grad_accum_steps", options["grad_accum_steps"], low=1)}

    def accumulate(self, host: DerivationHost) -> bool:
        groups = host.param_groups
        steps = groups[0]["grad_accum_steps"]
        if steps == 1:
            return True
        if (groups[0][CALLS] + 1) % steps != 0:
            for p in _params_with_grad(host):
                self.zeros_state(host, p, BUFFER, _buffer_dtype(p)).add_(p.grad)
            return False
        sync = sync_group(host)
        restore: list[tuple[Tensor, Tensor | None]] = []
        for group in groups:
            for p in group["params"]:
                buffer = host.state[p].get(BUFFER)
                if buffer is None and p.grad is None:
                    continue
                if buffer is not None and sync is None and host._defer_mean(group, p, buffer, steps):
                    continue  # averaged (and the buffer cleared) inside the base optimizer's fused pass
                restore.append((p, p.grad))
                p.grad = _mean_gradient(p, buffer, steps)
        host.__dict__[_RESTORE] = restore
        if sync is not None:  # the gradients were left unsynchronized (danlu.distributed.sync_on_apply)
            all_reduce_mean_([p.grad for p, _ in restore], sync)
        return True

    def init_state(self, host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        if group["grad_accum_steps"] > 1:
            for p in params:
                self.zeros_state(host, p, BUFFER, _buffer_dtype(p))

    def finish(self, host: DerivationHost, failed: bool) -> None:
        restore = host.__dict__.pop(_RESTORE, [])
        for p, grad in restore:
            if failed and (grad is None or grad.is_sparse):
                p.grad = grad
            buffer = host.state[p].get(BUFFER)
            if buffer is not None and not failed:
                buffer.zero_()


def _params_with_grad(host: DerivationHost) -> list[Tensor]:
    return [p for group in host.param_groups for p in group["params"] if p.grad is not None]


def _mean_gradient(p: Tensor, buffer: Tensor | None, steps: int) -> Tensor:
    """(this call's gradient + the buffered sum) / steps, written into p.grad where it is dense."""
    grad = p.grad
    if grad is None:
        assert buffer is not None
        return buffer.div(steps).to(p.dtype)
    if grad.is_sparse:
        mean = grad.to_dense().to(_buffer_dtype(p))
        if buffer is not None:
            mean.add_(buffer)
        return mean.div_(steps).to(p.dtype)
    if buffer is not None:
        grad.add_(buffer)
    return grad.div_(steps)
