"""The seam between an optimizer and its derivations.

A derivation is a small set of hooks that the step of a derived optimizer calls
in a fixed order (see :mod:`danlu._host`):

0. ``check`` (every derivation, before anything changes): raise if this call
   cannot be taken; then ``skip``: may drop the call entirely, before any other
   hook of any derivation (non-finite gradients);
1. ``accumulate``: may withhold the step (gradient accumulation);
   then ``transform_gradients`` (every derivation with ``has_gradient_hook``): sees, once per
   applied step and over all groups, the gradients the base will use (``ctx.gradient(p)``, after
   accumulation's mean) and may replace or scale them through the step context, never writing
   into the caller's ``p.grad``; returning False drops the step;
2. ``lr_multiplier``: scales the group's learning rate for this step;
3. ``prepare``: creates state that must see the parameters before the update;
4. ``transform``: rewrites the proposed update ``u = p_new - p_old`` of the
   tensors it ``selects`` (weight decay, layer adaptation, lazy rows,
   per-parameter lr), innermost derivation first;
5. ``after_step``: acts on the new parameters (Lookahead, EMA);
6. ``finish``: after an applied step, whether it succeeded or raised.

Derivations keep their hyperparameters in the param groups (under bert4keras'
names) and their tensors in ``optimizer.state[p]`` under namespaced keys, so
``state_dict()`` carries everything.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from danlu._native_spec import Fusion
from danlu._validate import check_patterns

if TYPE_CHECKING:
    from danlu._context import StepContext
    from danlu._host import DerivationHost

__all__ = [
    "Derivation",
    "matches_any",
    "by_device_and_dtype",
    "wide_dtype",
    "as_counter",
    "APPLIED_STEPS",
    "CALLS",
    "GROUP_COUNTERS",
]

APPLIED_STEPS = "applied_steps"
"""Param-group key: the number of steps applied so far (buffering calls excluded)."""
CALLS = "calls"
"""Param-group key: the number of ``step()`` calls so far (buffering calls included)."""
GROUP_COUNTERS = (APPLIED_STEPS, CALLS)
"""The counters every derived optimizer keeps in each group, as 0-dim int64 CPU tensors.

Tensors rather than ints so that a step traced by ``torch.compile`` reads them as graph inputs
(an int would be a constant of the graph, which then recompiles at every step). Each count makes a
new tensor, so a state dict taken earlier keeps its values.
"""


def as_counter(value: Any) -> Tensor:
    """A group counter as a new 0-dim int64 CPU tensor (from an int, or from a saved tensor)."""
    if isinstance(value, Tensor):
        return value.detach().to(device="cpu", dtype=torch.int64, copy=True).reshape(())
    return torch.tensor(int(value), dtype=torch.int64)


@functools.lru_cache(maxsize=65536)
def matches_any(patterns: tuple[str, ...], name: str) -> bool:
    """True if any regular expression in ``patterns`` is found (``re.search``) in ``name``."""
    return any(re.search(p, name) for p in patterns)


class Derivation:
    """Base class of the derivations: every hook is optional and does nothing by default.

    Example:
        >>> import torch, danlu
        >>> class Freeze(Derivation):   # rewrites the proposed update of every tensor
        ...     name, title, has_transform = "freeze", "Freeze", True
        ...     def transform(self, host, group, olds, updates, grads, names, lrs):
        ...         torch._foreach_zero_(updates)
        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> opt = danlu.derive.extend_with(danlu.Adam, Freeze())([w], lr=1.0)
        >>> w.grad = torch.ones(1); _ = opt.step(); w.item()
        1.0
    """

    name: ClassVar[str] = ""
    """Short name used in ``create_optimizer`` specs and in state-dict signatures."""
    title: ClassVar[str] = ""
    """CamelCase name used for the derived class (``AdamWithLookahead``)."""
    defaults: ClassVar[dict[str, Any]] = {}
    """Keyword arguments and their defaults (bert4keras names)."""
    name_options: ClassVar[tuple[str, ...]] = ()
    """Options that match parameter names: they need an optimizer built from named parameters."""
    state_keys: ClassVar[tuple[str, ...]] = ()
    """Namespaced keys of the parameter-shaped tensors this derivation keeps in ``state[p]``."""
    required_state: ClassVar[tuple[str, ...]] = ()
    """State keys every parameter of a group has once the group applied a step."""
    counters: ClassVar[tuple[str, ...]] = ()
    """Param-group keys of integer counters this derivation keeps (start at 0, saved in ``state_dict``)."""
    counter_starts: ClassVar[dict[str, Any]] = {}
    """The counters that start at another value than 0 (a flag: False)."""
    has_transform: ClassVar[bool] = False
    has_gradient_hook: ClassVar[bool] = False
    """Whether ``transform_gradients`` does anything (it then runs on every applied step)."""
    methods: ClassVar[dict[str, Any]] = {}
    """Methods added to the derived class (``apply_ema_weights`` ...)."""
    native: ClassVar[Fusion | None] = None
    """How the native kernels fuse this derivation (``danlu._native_spec``); None: they do not know it, and
    a derivation with a transform then keeps its stack on the generic path."""

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Check the options (a param group or the constructor's keywords); return them normalized."""
        return {k: options[k] for k in self.defaults if k in options}

    def patterns(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The name patterns (or name keys) this group uses, by option name: its ``name_options``.

        For the 'needs names' and 'matches nothing' checks, which iterate each value.
        """
        return {key: group[key] for key in self.name_options}

    def check_outer(self, outer: Derivation) -> None:
        """Called when ``outer`` is applied over a class that has this derivation: raise if that stack cannot work."""

    def check(self, host: DerivationHost) -> None:
        """Called on every ``step()`` before anything changes: raise if the call cannot be taken."""

    def traced_check(self, host: DerivationHost) -> None:
        """Under ``torch.compile``: the part of :meth:`check` that reads tensor values, as ``torch._assert_async``.

        Runs in the graph before the step's ``no_grad`` block (a graph that raises inside one leaves
        gradients disabled), so it raises before anything changes.
        """

    def skip(self, host: DerivationHost) -> bool | Tensor:
        """Called on every ``step()`` before every other hook; return True to drop the call (nothing changes).

        Under ``torch.compile`` it may return a 0-dim bool tensor instead: the traced step then runs on
        and keeps nothing of the call where the tensor is True (see ``danlu._host._Gate``).
        """
        return False

    def accumulate(self, host: DerivationHost, ctx: StepContext) -> bool:
        """Called on every ``step()``; return False to withhold the step (the call only buffers)."""
        return True

    def transform_gradients(self, host: DerivationHost, ctx: StepContext) -> bool | None:
        """Once per applied step: replace (``ctx.replace``) or scale (``ctx.scale``) the gradients the base uses.

        ``ctx.gradient(p)`` is the gradient after accumulation's mean, over every group. Never write
        into it in place: it may be the caller's ``p.grad``. Return False to drop the step (nothing
        else changes).
        """
        return None

    def lr_multiplier(self, group: Mapping[str, Any]) -> float:
        return 1.0

    def prepare(self, host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        """Before the base update, for the parameters that have a gradient."""

    def selects(self, group: Mapping[str, Any], name: str | None) -> bool:
        """Whether ``transform`` acts on the parameter called ``name`` in ``group``."""
        return self.has_transform

    def transform(
        self,
        host: DerivationHost,
        group: Mapping[str, Any],
        olds: list[Tensor],
        updates: list[Tensor],
        grads: list[Tensor],
        names: list[str | None],
        lrs: list[float],
    ) -> None:
        """Rewrite ``updates`` in place; ``olds`` are the parameters before the step, ``lrs`` each tensor's lr_t."""

    def after_step(self, host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        """After the update is written and ``group[APPLIED_STEPS]`` counts it."""

    def init_state(self, host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        """Create the state entries that the first step creates, with their values before any step."""

    def finish(self, host: DerivationHost, failed: bool) -> None:
        """After a step that was applied (or failed while being applied), whether it succeeded or raised."""

    @staticmethod
    def zeros_state(host: DerivationHost, p: Tensor, key: str, dtype: torch.dtype | None = None) -> Tensor:
        state = host.state[p]
        if key not in state:
            state[key] = torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
        return state[key]


def wide_dtype(group: Mapping[str, Any], p: Tensor) -> torch.dtype:
    """The dtype of a derivation's parameter-shaped state (slow weights, EMA weights) for ``p``.

    The wider of the parameter's dtype and the group's state dtype (``danlu._precision``): float32
    for 16-bit parameters by default, never narrower than the parameter.
    """
    from danlu._precision import compute_dtype

    if not p.is_floating_point():
        return p.dtype
    return torch.promote_types(p.dtype, compute_dtype(p, group.get("state_dtype")))


def checked_patterns(options: Mapping[str, Any], key: str) -> dict[str, tuple[str, ...]]:
    """``{key: patterns}`` checked as regular expressions if ``options`` has ``key``, else ``{}``."""
    return {key: check_patterns(key, options[key])} if key in options else {}


def by_device_and_dtype(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` bucketed by (device, dtype), the unit of one foreach call."""
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.device, t.dtype), []).append(i)
    return list(buckets.values())
