"""Skipping calls whose gradients are not finite (``extend_with_skip_nonfinite``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from danlu._distributed import all_finite, sync_group
from danlu._native_spec import NoTensorWork
from danlu._validate import check_int
from danlu.derivations._base import Derivation

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

    def skip(self, host: DerivationHost) -> bool:
        groups = host.param_groups
        grads: list[Tensor] = [p.grad for g in groups for p in g["params"] if p.grad is not None]
        if all_finite(grads, sync_group(host)):
            return False
        self.count_skip(host)
        return True

    def accumulate(self, host: DerivationHost, ctx: StepContext) -> bool:
        ctx.cleanup.append(lambda failed: None if failed or ctx.dropped else _reset_consecutive(host))
        return True

    def count_skip(self, host: DerivationHost) -> None:
        """Count a dropped call (also one that another derivation drops for a non-finite value), or raise past the limit."""
        groups = host.param_groups
        limit = groups[0]["max_consecutive_skips"]
        consecutive = groups[0].get(CONSECUTIVE_SKIPS, 0)
        if limit is not None and consecutive >= limit:
            raise FloatingPointError(
                f"the gradients are not finite (inf or nan) in {consecutive + 1} calls in a row, "
                f"more than max_consecutive_skips={limit}: the run has diverged (nothing was changed)"
            )
        for group in groups:
            group[SKIPS] = group.get(SKIPS, 0) + 1
            group[CONSECUTIVE_SKIPS] = group.get(CONSECUTIVE_SKIPS, 0) + 1


def _reset_consecutive(host: DerivationHost) -> None:
    for group in host.param_groups:
        if group.get(CONSECUTIVE_SKIPS):
            group[CONSECUTIVE_SKIPS] = 0
