"""Helpers for data-parallel training (see the "distributed training" page of the docs).

danlu's optimizers need no wrapper under DDP (the parameters and gradients are ordinary tensors,
identical on every process) or under FSDP2 (``fully_shard``: the parameters, gradients and state
are DTensors; every norm and mean danlu takes is over the whole tensor). The one thing that needs
help is gradient accumulation with DDP without an all-reduce on every call: :func:`sync_on_apply`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from danlu._distributed import GRAD_SYNC
from danlu.derivations import GradientAccumulation

__all__ = ["sync_on_apply"]


@contextlib.contextmanager
def sync_on_apply(model: Any, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Gradient accumulation under DDP with one all-reduce per applied step instead of one per call.

    Wrap the forward and backward passes of every call (buffering or applying)::

        opt = danlu.create_optimizer(model, "adamw+grad_accum", lr=1e-3, grad_accum_steps=4)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        for batch in loader:
            with danlu.distributed.sync_on_apply(ddp, opt):
                loss_fn(ddp(batch)).backward()
            opt.step()
            opt.zero_grad()

    Inside, DDP does not all-reduce (``ddp.no_sync()``); the optimizer buffers each process's own
    gradients, and on the ``grad_accum_steps``-th call it averages the mean gradient over DDP's
    process group with one all-reduce per dtype before the step. The parameters are those of DDP
    without ``no_sync`` (and of one process with the whole batch), with ``grad_accum_steps`` times
    fewer all-reduces. With :func:`danlu.extend_with_skip_nonfinite` the decision to skip a call is
    all-reduced too, so that every process skips the same calls.

    Between the calls of a cycle the buffers hold each process's own sums: a checkpoint of rank
    0's ``state_dict()`` taken mid-cycle does not have the other processes' gradients. Save at the
    end of a cycle (``opt.param_groups[0]["calls"] % grad_accum_steps == 0``), or save every rank's
    state (``torch.distributed.checkpoint``). For an optimizer without gradient accumulation (or
    with ``grad_accum_steps=1``) this does nothing: DDP synchronizes as usual.

    Args:
        model: the ``DistributedDataParallel`` module (anything with ``no_sync()`` and
            ``process_group``).
        optimizer: the optimizer that steps the model's parameters.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"sync_on_apply: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    no_sync = getattr(model, "no_sync", None)
    if not callable(no_sync):
        raise TypeError(
            f"sync_on_apply: model must be a DistributedDataParallel module (with no_sync()), got {type(model).__name__}"
        )
    accumulates = any(isinstance(d, GradientAccumulation) for d in getattr(optimizer, "_danlu_derivations", ()))
    if not accumulates or optimizer.param_groups[0]["grad_accum_steps"] == 1:
        yield
        return
    group = getattr(model, "process_group", None)
    if group is None:
        import torch.distributed as dist

        group = dist.group.WORLD
    optimizer.__dict__[GRAD_SYNC] = group
    with no_sync():
        yield
