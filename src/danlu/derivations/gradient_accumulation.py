"""Gradient accumulation (``extend_with_gradient_accumulation``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from danlu._distributed import all_reduce_mean_, sync_group
from danlu._native_spec import AccumulationMean
from danlu._validate import check_int
from danlu.derivations._base import CALLS, Derivation

if TYPE_CHECKING:
    from danlu._context import StepContext
    from danlu._host import DerivationHost

__all__ = ["GradientAccumulation"]

BUFFER = "accum.grad"


def _buffer_dtype(p: Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class GradientAccumulation(Derivation):
    r"""Apply one step every ``grad_accum_steps`` calls, with the mean of their gradients.

    The ``optax.MultiSteps`` semantics: calls :math:`1 \dots k-1` of each cycle only add ``p.grad``
    to a buffer (``state[p]["accum.grad"]``) and change nothing else; call :math:`k` forms the mean
    in that buffer (``p.grad`` is never written)

    .. math::

        \bar g = \frac{1}{k} \sum_{i=1}^{k} g_i

    which every gradient hook (such as clipping) then sees, and applies one step of the base
    optimizer with it. Buffering calls are not steps for any
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
        (tensor(4), tensor(2), 2.0)
    """

    name = "gradient_accumulation"
    title = "GradientAccumulation"
    defaults = {"grad_accum_steps": 2}
    state_keys = (BUFFER,)
    native = AccumulationMean()
    """Fused: the applying call's mean is formed in the update's pass."""

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        if "grad_accum_steps" not in options:
            return {}
        return {"grad_accum_steps": check_int("grad_accum_steps", options["grad_accum_steps"], low=1)}

    def accumulate(self, host: DerivationHost, ctx: StepContext) -> bool:
        groups = host.param_groups
        steps = groups[0]["grad_accum_steps"]
        if steps == 1:
            return True
        if torch.compiler.is_compiling():
            self._traced_accumulate(host, ctx, steps)
            return True
        if (int(groups[0][CALLS]) + 1) % steps != 0:
            self._buffer(host)
            return False
        sync = sync_group(host)
        defer = sync is None and not host._has_gradient_hooks()  # a gradient hook needs the mean formed first
        buffers: list[Tensor] = []
        deferred: list[tuple[int, Tensor]] = []
        grouped: list[tuple[dict[str, Any], list[Tensor]]] = []
        means: list[Tensor] = []
        for group in groups:
            if defer and host._defer_group_means(ctx, group, BUFFER, steps):  # every tensor at once (the steady pass)
                grouped.append((group, ctx.pending_groups[id(group)][0]))
                continue
            for p in group["params"]:
                buffer = host.state[p].get(BUFFER)
                if buffer is None and p.grad is None:
                    continue
                if buffer is not None and defer and host._defer_mean(ctx, group, p, buffer, steps):
                    # averaged and cleared inside the base optimizer's native pass (where the generic
                    # path takes it instead, danlu._fused.settle_gradients clears it after the step)
                    deferred.append((id(p), buffer))
                    continue
                if buffer is not None:
                    buffers.append(buffer)
                mean = _mean_gradient(p, buffer, steps)
                ctx.replace(p, mean)
                means.append(mean)
        if sync is not None:  # the gradients were left unsynchronized (danlu.distributed.sync_on_apply)
            all_reduce_mean_(means, sync)
        ctx.cleanup.append(lambda failed: _clear(buffers, failed, ctx, deferred, grouped))
        return True

    def _buffer(self, host: DerivationHost) -> None:
        """A buffering call: add every gradient to its buffer (one foreach add; per tensor for sparse gradients)."""
        params = _params_with_grad(host)
        buffers = [self.zeros_state(host, p, BUFFER, _buffer_dtype(p)) for p in params]
        grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
        if any(g.is_sparse for g in grads):
            for buffer, grad in zip(buffers, grads):
                buffer.add_(grad)
            return
        torch._foreach_add_(buffers, grads)  # per pair as add_ (a float32 buffer takes a 16-bit gradient exactly)

    def _traced_accumulate(self, host: DerivationHost, ctx: StepContext, steps: int) -> None:
        """Every traced call buffers and proposes the mean; ``ctx.applies`` says whether it is a step.

        The buffer is cleared after a call that applies; after one that does not, the host's gate
        puts back everything else the call wrote.
        """
        ctx.applies = torch.remainder(host.param_groups[0][CALLS] + 1, steps) == 0
        buffers: list[Tensor] = []
        for p in [p for group in host.param_groups for p in group["params"]]:
            if p.grad is None and BUFFER not in host.state[p]:
                continue
            buffer = self.zeros_state(host, p, BUFFER, _buffer_dtype(p))
            if p.grad is not None:
                buffer.add_(p.grad.to_dense() if p.grad.is_sparse else p.grad)
            ctx.replace(p, buffer / steps)
            ctx.gate_exempt.add(id(buffer))
            buffers.append(buffer)
        applies = ctx.applies
        ctx.cleanup.append(lambda failed: _clear_where(buffers, applies))

    def init_state(self, host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        if group["grad_accum_steps"] > 1:
            for p in params:
                self.zeros_state(host, p, BUFFER, _buffer_dtype(p))


def _clear(
    buffers: list[Tensor],
    failed: bool,
    ctx: StepContext,
    deferred: list[tuple[int, Tensor]],
    grouped: list[tuple[dict[str, Any], list[Tensor]]],
) -> None:
    """Zero the buffers after a step; those whose mean a native pass formed are zero already (one pass less)."""
    if failed:
        return
    for group, group_buffers in grouped:
        if ctx.pending_groups.pop(id(group), None) is not None:  # a group's deferred means that no pass took
            buffers = [*buffers, *group_buffers]
        elif ctx.pending_means:  # the group took the general path, its means deferred one by one
            deferred = [*deferred, *zip(map(id, group["params"]), group_buffers)]
    if buffers:
        torch._foreach_zero_(buffers)
    for key, buffer in deferred:
        if ctx.pending_means.pop(key, None) is not None:  # a deferred mean that no pass took
            buffer.zero_()


def _clear_where(buffers: list[Tensor], applies: Tensor) -> None:
    for buffer in buffers:
        buffer.copy_(torch.where(applies, torch.zeros_like(buffer), buffer))


def _params_with_grad(host: DerivationHost) -> list[Tensor]:
    return [p for group in host.param_groups for p in group["params"] if p.grad is not None]


def _mean_gradient(p: Tensor, buffer: Tensor | None, steps: int) -> Tensor:
    """(this call's gradient + the buffered sum) / steps, formed in the buffer (never in ``p.grad``)."""
    grad = p.grad
    if buffer is None:
        assert grad is not None
        dense = grad.to_dense() if grad.is_sparse else grad
        return dense.div(steps)
    if grad is not None:
        buffer.add_(grad.to_dense() if grad.is_sparse else grad)
    return buffer.div_(steps)
