"""Skipping calls whose gradients are not finite (``extend_with_skip_nonfinite``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from danlu._distributed import all_finite, nonfinite_flag, sync_group
from danlu._native_spec import NoTensorWork
from danlu._validate import check_int
from danlu.derivations._base import Derivation, as_counter

if TYPE_CHECKING:
    from danlu._context import StepContext
    from danlu._host import DerivationHost

__all__ = ["SkipNonfinite", "SKIPS", "CONSECUTIVE_SKIPS"]

SKIPS = "nonfinite_skips"
"""Param-group key: the number of calls skipped because a gradient was inf or nan."""
CONSECUTIVE_SKIPS = "consecutive_nonfinite_skips"
"""Param-group key: the number of such calls since the last call with finite gradients."""


class SkipNonfinite(Derivation):
    r"""Drop every ``step()`` call whose gradients contain ``inf`` or ``nan``, as if it was never made.

    Before any other hook of any derivation, the gradients of every parameter (every group) are
    checked; if one element is not finite, the call changes nothing: not the parameters, not the
    base optimizer's state, not the accumulation buffer, not Lookahead's or EMA's state, not the
    counters ``applied_steps`` and ``calls`` (a skipped call is not a call for any derivation or
    for the lr schedule). Only ``nonfinite_skips`` (in every param group, saved in ``state_dict``)
    counts it, and ``consecutive_nonfinite_skips`` counts the skips since the last finite call.

    The decision is the same on every process: under FSDP2 the shards' verdicts are combined with
    one all-reduce; under DDP the gradients are already identical (with
    :func:`danlu.distributed.sync_on_apply` the verdict is all-reduced over DDP's group). Its place
    in the stack of derivations does not matter.

    ``torch.amp.GradScaler`` already skips ``optimizer.step()`` when the scaled gradients overflow,
    which is the same thing for every derivation; this derivation is for the runs without a
    scaler (bf16, fp32) and for non-finite values the scaler does not see.

    Keyword arguments: ``max_consecutive_skips=None``: with an int ``n >= 1``, the call that would
    be the ``n + 1``-th skip in a row raises ``FloatingPointError`` instead (nothing changes), so
    that a diverged run stops instead of skipping forever.

    Under ``torch.compile`` the verdict and the counts are tensor ops (the counters are then 0-dim
    int64 tensors): the call runs whole and the host puts back what a skipped call wrote. Past the
    limit the compiled step raises a ``RuntimeError`` with the same message, before any write.

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = danlu.extend_with_skip_nonfinite(danlu.SGD)([w], lr=0.5, max_consecutive_skips=3)
        >>> w.grad = torch.tensor([float("inf"), 1.0]); _ = opt.step()   # dropped
        >>> w.grad = torch.tensor([1.0, 1.0]); _ = opt.step()            # applied
        >>> w.detach(), opt.param_groups[0]["nonfinite_skips"], int(opt.param_groups[0]["calls"])
        (tensor([0.5000, 0.5000]), 1, 1)
    """

    name = "skip_nonfinite"
    title = "SkipNonfinite"
    defaults: ClassVar[dict[str, Any]] = {"max_consecutive_skips": None}
    counters = (SKIPS, CONSECUTIVE_SKIPS)
    native = NoTensorWork()
    """Skips whole calls: nothing per tensor."""

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        if "max_consecutive_skips" not in options:
            return {}
        value = options["max_consecutive_skips"]
        return {"max_consecutive_skips": None if value is None else check_int("max_consecutive_skips", value, low=1)}

    def skip(self, host: DerivationHost) -> bool | Tensor:
        groups = host.param_groups
        grads: list[Tensor] = [p.grad for g in groups for p in g["params"] if p.grad is not None]
        if torch.compiler.is_compiling():
            return _traced_skip(host, grads)
        if all_finite(grads, sync_group(host)):
            return False
        self.count_skip(host)
        return True

    def accumulate(self, host: DerivationHost, ctx: StepContext) -> bool:
        if not torch.compiler.is_compiling():  # a traced call counts in skip() (see _traced_skip)
            ctx.cleanup.append(lambda failed: None if failed or ctx.dropped else _reset_consecutive(host))
        return True

    def traced_check(self, host: DerivationHost) -> None:
        """Past ``max_consecutive_skips``, raise in the graph (on the CPU) before anything changes.

        A ``RuntimeError`` with the eager step's account (a traced step cannot raise a
        ``FloatingPointError`` on a tensor's value without a graph break); one more infinity norm per gradient.
        """
        groups = host.param_groups
        limit = groups[0]["max_consecutive_skips"]
        if limit is None:
            return
        grads: list[Tensor] = [p.grad for g in groups for p in g["params"] if p.grad is not None]
        bad = nonfinite_flag(grads, sync_group(host)) != 0
        consecutive = as_counter(groups[0].get(CONSECUTIVE_SKIPS, 0))
        torch._assert_async(~(bad & (consecutive >= limit)), _too_many_traced(limit))

    def count_skip(self, host: DerivationHost) -> None:
        """Count a dropped call (also one that another derivation drops for a non-finite value), or raise past the limit."""
        groups = host.param_groups
        limit = groups[0]["max_consecutive_skips"]
        consecutive = int(groups[0].get(CONSECUTIVE_SKIPS, 0))
        if limit is not None and consecutive >= limit:
            raise FloatingPointError(_too_many(consecutive, limit))
        for group in groups:
            group[SKIPS] = int(group.get(SKIPS, 0)) + 1
            group[CONSECUTIVE_SKIPS] = int(group.get(CONSECUTIVE_SKIPS, 0)) + 1


def _too_many_traced(limit: int) -> str:
    return (
        f"the gradients are not finite (inf or nan) in more than max_consecutive_skips={limit} calls in a row: "
        "the run has diverged (nothing was changed)"
    )


def _too_many(consecutive: int, limit: int) -> str:
    return (
        f"the gradients are not finite (inf or nan) in {consecutive + 1} calls in a row, "
        f"more than max_consecutive_skips={limit}: the run has diverged (nothing was changed)"
    )


def _traced_skip(host: DerivationHost, grads: list[Tensor]) -> Tensor:
    """The verdict as a 0-dim bool tensor (True: drop the call) and the counts, as tensor ops: no host read.

    The counters become 0-dim int64 tensors (graph inputs; as Python ints they would be constants of
    the graph); the limit is :meth:`SkipNonfinite.traced_check`'s.
    """
    bad = nonfinite_flag(grads, sync_group(host)) != 0
    for group in host.param_groups:
        group[SKIPS] = as_counter(group.get(SKIPS, 0)) + bad
        group[CONSECUTIVE_SKIPS] = torch.where(bad, as_counter(group.get(CONSECUTIVE_SKIPS, 0)) + 1, 0)
    return bad


def _reset_consecutive(host: DerivationHost) -> None:
    for group in host.param_groups:
        if group.get(CONSECUTIVE_SKIPS):
            group[CONSECUTIVE_SKIPS] = 0
