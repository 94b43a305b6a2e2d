"""The step that every danlu optimizer and every derived optimizer runs.

:class:`DerivationHost` is a mixin over ``torch.optim.Optimizer``. It owns the
order of the derivation hooks (see :mod:`danlu.derivations._base`) and leaves one
method to its subclasses, ``_base_step(lr_scales)``: apply one step of the
underlying algorithm with each group's learning rate multiplied by its scale,
handing every proposed update to :meth:`DerivationHost._apply_transforms` before
it is written. danlu's own optimizers do that on the update they compute (no
parameter copy); a foreign optimizer is run on a snapshot of only the parameters
that some transform selects (:class:`danlu.derive.ForeignHost`).

Under ``torch.compile`` the step takes a traced form (:meth:`DerivationHost._traced_step`) in which
nothing that changes from step to step is a Python number: the group counters ``calls`` and
``applied_steps`` are 0-dim int64 tensors, ``state[p]["step"]`` stays a tensor, and the decisions
that depend on them (gradient accumulation applies or buffers, Lookahead syncs) act through
``torch.where``. A buffering call of gradient accumulation runs the whole step and then puts back
every tensor it wrote (:class:`_Gate`), so that one graph serves every call.
"""

from __future__ import annotations

import copy
import functools
import math
import operator
from collections.abc import Callable
from itertools import chain, repeat
from numbers import Real
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import required

from danlu._context import StepContext
from danlu._distributed import all_zero
from danlu._params import normalize_group
from danlu._state import check_state_dict, keep_state_dtypes, normalize_loaded_groups, restore_derivation_state
from danlu.derivations._base import APPLIED_STEPS, CALLS, GROUP_COUNTERS, Derivation, as_counter
from danlu.derivations.weight_decay import adopt_torch_weight_decay

__all__ = ["DerivationHost"]

STEP_GRADIENTS = "_danlu_step_gradients"
"""The attribute that holds, during one eager step, the gradients it read (see ``DerivationHost._step_gradients``)."""
_GRAD = operator.attrgetter("grad")


class DerivationHost(torch.optim.Optimizer):
    """Mixin: the derivation-aware ``step`` shared by danlu's and derived foreign optimizers."""

    _danlu_derivations: ClassVar[tuple[Derivation, ...]] = ()
    _danlu_overrides: dict[str, Any]
    _danlu_reports: dict[str, Any]
    """What derivations report for logging (``grad_norm``): a dict made at construction, because a
    compiled step writes into a dict the optimizer already holds but drops attributes it sets."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_danlu_reports", {})

    # ---------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = normalize_group(param_group, "param_group")
        adopt_torch_weight_decay(self, group)
        for key, default in self.defaults.items():
            if default is not required:
                group.setdefault(key, copy.deepcopy(default))
        if self._danlu_derivations:
            self._fill_derivation_options(group)
        self._validate_group(group)
        super().add_param_group(group)

    def _fill_derivation_options(self, group: dict[str, Any]) -> None:
        overrides = getattr(self, "_danlu_overrides", {})
        for derivation in self._danlu_derivations:
            for key, default in derivation.defaults.items():
                if key not in group:
                    group[key] = copy.deepcopy(overrides.get(key, default))
            group.update(derivation.validate(group))
        existing = getattr(self, "param_groups", None)
        template = existing[0] if existing else {}
        for key in GROUP_COUNTERS:
            group[key] = as_counter(group.get(key, template.get(key, 0)))
        for derivation in self._danlu_derivations:
            for key in derivation.counters:
                group.setdefault(key, template.get(key, derivation.counter_starts.get(key, 0)))

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check the algorithm's hyperparameters of one group (danlu's optimizers override this)."""

    # ----------------------------------------------------------------- state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict after checking that it fits (a ``ValueError`` says what does not; nothing changes).

        Unlike ``torch.optim``, the dtypes of the saved state are kept (torch casts floating-point
        state to the parameter dtype), so float32 state of bf16 parameters stays float32. The
        derivations' entries are set aside while the base optimizer loads its own, so that a base
        which inspects its state on load sees only what it wrote.
        """
        state_dict = normalize_loaded_groups(self, state_dict)
        check_state_dict(self, state_dict)
        keys = tuple(dict.fromkeys(key for d in self._danlu_derivations for key in d.state_keys))  # one order on every process
        base_part = {
            **state_dict,
            "state": {pid: {k: v for k, v in entry.items() if k not in keys} for pid, entry in state_dict["state"].items()},
        }
        super().load_state_dict(base_part)
        if self._danlu_derivations:
            for group in self.param_groups:  # a state dict saved before the counters were tensors holds ints
                for key in GROUP_COUNTERS:
                    group[key] = as_counter(group.get(key, 0))
        restore_derivation_state(self, state_dict, keys)
        keep_state_dtypes(self, state_dict)
        self.__dict__.pop("_danlu_name_cache", None)
        self.__dict__.pop("_danlu_fused_plans", None)  # danlu._fused caches pointers to the state tensors

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step (or, under gradient accumulation, buffer one gradient)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        tracing = torch.compiler.is_compiling()
        if tracing and self._needs_eager_call():
            _eager_call(self)  # outside any block: a graph break inside one is counted twice
            return loss
        if tracing:
            for derivation in self._danlu_derivations:
                derivation.traced_check(self)  # outside no_grad: a graph raising inside it would leave gradients off
        with torch.no_grad():
            if tracing:
                self._traced_step()
            else:
                self._eager_step()
        return loss

    def _eager_step(self) -> None:
        self.__dict__[STEP_GRADIENTS] = [list(map(_GRAD, group["params"])) for group in self.param_groups]
        try:
            self._checked_eager_step()
        finally:
            del self.__dict__[STEP_GRADIENTS]

    def _checked_eager_step(self) -> None:
        self._check_gradients()
        self._check_lrs()
        if not self.state and self._is_state_init_call():
            self._init_all_state()
            return
        if not self._any_gradient():
            return  # as in torch.optim: a step without gradients changes nothing and counts for nothing
        if self._danlu_derivations:
            self._derived_step(StepContext(self))
        else:
            self._base_step(StepContext(self))

    def _step_gradients(self) -> list[list[Any]] | None:
        """Every ``p.grad`` as the eager step read them when it began (one read per tensor), per group; None outside it."""
        return self.__dict__.get(STEP_GRADIENTS)

    def _any_gradient(self) -> bool:
        grads = self._step_gradients()
        if grads is not None:
            return any(map(operator.is_not, chain.from_iterable(grads), repeat(None)))
        return any(p.grad is not None for group in self.param_groups for p in group["params"])

    def _derived_step(self, ctx: StepContext) -> None:
        derivations = self._danlu_derivations
        for derivation in derivations:
            derivation.check(self)
        if any(d.skip(self) for d in derivations):
            return
        undo = _Undo(self)
        failed = True
        try:
            if not all([d.accumulate(self, ctx) for d in derivations]):
                self._count(CALLS)
            elif not all([d.transform_gradients(self, ctx) is not False for d in derivations]):
                ctx.dropped = True  # nothing is applied; an accumulation cycle is consumed (its buffers cleared)
                self._count(CALLS)
            else:
                self._apply_step(ctx)
            failed = False
        except BaseException:
            undo.restore()
            raise
        finally:
            ctx.finish(failed)

    def _apply_step(self, ctx: StepContext) -> None:
        derivations = self._danlu_derivations
        ctx.cleanup.append(self._finish_derivations)
        ctx.lr_scales = [math.prod(d.lr_multiplier(g) for d in derivations) for g in self.param_groups]
        for derivation in derivations:
            for group in self.param_groups:
                derivation.prepare(self, group, group["params"])
        self._base_step(ctx)
        self._count(CALLS)
        self._count(APPLIED_STEPS)
        for index, derivation in enumerate(derivations):
            for group in self.param_groups:
                derivation.after_step(self, group, self._after_step_params(ctx, index, group))

    def _needs_eager_call(self) -> bool:
        """Whether a traced call runs eagerly instead (a foreign base whose state its first step creates)."""
        return False

    def _traced_step(self) -> None:
        """The step as ``torch.compile`` traces it: the hooks of :meth:`step`, branch-free on the counters.

        The lr check is left out (as in ``torch.optim``, whose step checks nothing: a Python check of a
        traced lr would tie the graph to its value), and so is the rollback of a failed step. A call
        that a derivation's ``skip`` may drop (a tensor verdict) or that gradient accumulation may only
        buffer runs whole, and :class:`_Gate` then puts back what it must not have changed.
        """
        self._check_gradients()
        if not self._any_gradient():
            return
        ctx = StepContext(self)
        derivations = self._danlu_derivations
        if not derivations:
            self._base_step(ctx)
            return
        for derivation in derivations:
            derivation.check(self)
        verdicts = [d.skip(self) for d in derivations]
        if any(v is True for v in verdicts):
            return
        skips = [v for v in verdicts if isinstance(v, Tensor)]
        gate = None
        if skips:
            ctx.counts = ~_any_of(skips)
            own = {key for d, v in zip(derivations, verdicts) if isinstance(v, Tensor) for key in d.counters}
            gate = _Gate(self, ctx, own)  # before accumulation writes its buffers: a skipped call keeps none of it
        for derivation in derivations:
            derivation.accumulate(self, ctx)  # under tracing it never withholds: it sets ctx.applies
        if gate is None and ctx.applies is not None:
            gate = _Gate(self, ctx, set())
        if not all([d.transform_gradients(self, ctx) is not False for d in derivations]):
            ctx.dropped = True  # as in the eager step: nothing but the buffers was written
            self._count(CALLS, ctx.counts)
            self._close(ctx, gate)
            return
        ctx.lr_scales = [_product([d.lr_multiplier(g) for d in derivations]) for g in self.param_groups]
        for derivation in derivations:
            for group in self.param_groups:
                derivation.prepare(self, group, group["params"])
        self._base_step(ctx)
        self._count(CALLS, ctx.counts)
        self._count(APPLIED_STEPS, _all_of([ctx.applies, ctx.counts]))
        for derivation in derivations:
            for group in self.param_groups:
                derivation.after_step(self, group, group["params"])
        self._close(ctx, gate)

    @staticmethod
    def _close(ctx: StepContext, gate: _Gate | None) -> None:
        """End a traced step: the cleanups (accumulation clears its buffers where it applied), then the gate."""
        ctx.finish(False)
        if gate is not None:
            gate.close()

    def _finish_derivations(self, failed: bool) -> None:
        for derivation in self._danlu_derivations:
            derivation.finish(self, failed)

    @staticmethod
    def _after_step_params(ctx: StepContext, index: int, group: dict[str, Any]) -> list[Tensor]:
        """The parameters of ``group`` whose ``after_step`` of derivation ``index`` is still to run.

        danlu's native path runs Lookahead and EMA inside its update pass and leaves only the rest here.
        """
        done = ctx.fused_after.pop((index, id(group)), None)
        params = group["params"]
        if not done:
            return params
        if len(done) == len(params):  # done holds ids of this group's (distinct) parameters: all of them
            return []
        return [p for p in params if id(p) not in done]

    def _defer_mean(self, ctx: StepContext, group: dict[str, Any], p: Tensor, buffer: Tensor, steps: int) -> bool:
        """Whether the base step forms ``p``'s accumulated mean itself (in its native pass)."""
        return False

    def _defer_group_means(self, ctx: StepContext, group: dict[str, Any], key: str, steps: int) -> bool:
        """Whether the base step forms the accumulated mean of every tensor of ``group`` (buffers ``state[p][key]``) in one pass."""
        return False

    def _has_gradient_hooks(self) -> bool:
        return any(d.has_gradient_hook for d in self._danlu_derivations)

    def _check_lrs(self) -> None:
        """Refuse, before anything changes, an lr that a scheduler or a hand set to nan, inf or < 0."""
        for index, group in enumerate(self.param_groups):
            lr = group.get("lr")
            if lr is None or isinstance(lr, Tensor):
                continue
            if isinstance(lr, bool) or not isinstance(lr, Real):
                raise TypeError(f"Invalid lr in parameter group {index}: expected a number, got {type(lr).__name__} {lr!r}")
            if not (float(lr) >= 0 and math.isfinite(float(lr))):
                raise ValueError(f"Invalid lr in parameter group {index}: {lr!r} (expected a finite number >= 0); nothing was changed")

    def _is_state_init_call(self) -> bool:
        """Whether this first call has every lr 0 and every gradient 0: a request to create the state.

        ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` creates the state of an
        optimizer that has none with exactly such a call (zero gradients for every parameter that
        requires one, lr 0 in every group), to learn the state's keys and shapes. For a derived
        optimizer that call is not a step: it would count for the counters, the schedule, the
        accumulation cycle, the bias correction and EMA. So it creates the state that the first
        step creates (zeros, Lookahead's slow weights) and changes nothing else.
        """
        groups = self.param_groups
        for group in groups:
            lr = group.get("lr", 0.0)
            if lr is None or (float(lr.item()) if isinstance(lr, Tensor) else float(lr)) != 0.0:
                return False
        grads = [p.grad for g in groups for p in g["params"] if p.requires_grad]
        if not grads or any(g is None for g in grads):
            return False
        return all_zero(grads)

    def _init_all_state(self) -> None:
        self._init_base_state()
        for derivation in self._danlu_derivations:
            for group in self.param_groups:
                derivation.init_state(self, group, [p for p in group["params"] if p.grad is not None])

    def _init_traced_state(self, params: list[Tensor]) -> None:
        """Create the missing state of ``params`` that their first step creates (see :class:`_Gate`)."""
        self._init_missing_base_state(params)
        chosen = {id(p) for p in params}
        for derivation in self._danlu_derivations:
            for group in self.param_groups:
                derivation.init_state(self, group, [p for p in group["params"] if id(p) in chosen])

    def _init_missing_base_state(self, params: list[Tensor]) -> None:
        """The base optimizer's state of ``params`` where it can be made without a step (a foreign base's cannot)."""

    def _init_base_state(self) -> None:
        """Create the base optimizer's state as its first step would (the base's own step for a foreign base)."""
        raise NotImplementedError

    def _count(self, key: str, increment: Tensor | None = None) -> None:
        """Add 1 (or ``increment``, a 0-dim tensor) to a group counter: a new tensor, so saved state dicts keep theirs."""
        for group in self.param_groups:
            group[key] = group[key] + (1 if increment is None else increment)


    def _check_gradients(self) -> None:
        """Reject gradients the algorithm cannot take, before anything changes."""

    def _base_step(self, ctx: StepContext) -> None:
        """Apply one step of the base algorithm with ``ctx.lr_scales`` and ``ctx``'s gradients, through the transforms."""
        raise NotImplementedError

    # ------------------------------------------------------------ transforms
    def _has_transforms(self) -> bool:
        return any(d.has_transform for d in self._danlu_derivations)

    def _selected_by_any(self, group: dict[str, Any], name: str | None) -> bool:
        return any(d.has_transform and d.selects(group, name) for d in self._danlu_derivations)

    def _apply_transforms(
        self,
        group: dict[str, Any],
        olds: list[Tensor],
        updates: list[Tensor],
        grads: list[Tensor],
        names: list[str | None],
        lrs: list[float],
    ) -> None:
        """Run every transform derivation, innermost first, over the tensors it selects."""
        for derivation in self._danlu_derivations:
            if not derivation.has_transform:
                continue
            chosen = [i for i, name in enumerate(names) if derivation.selects(group, name)]
            if not chosen:
                continue
            if len(chosen) == len(names):
                derivation.transform(self, group, olds, updates, grads, names, lrs)
            else:
                derivation.transform(
                    self,
                    group,
                    [olds[i] for i in chosen],
                    [updates[i] for i in chosen],
                    [grads[i] for i in chosen],
                    [names[i] for i in chosen],
                    [lrs[i] for i in chosen],
                )

    @staticmethod
    def _names(group: dict[str, Any]) -> list[str | None]:
        names = group.get("param_names")
        return list(names) if names is not None else [None] * len(group["params"])


@torch.compiler.disable
def _eager_call(host: DerivationHost) -> None:
    """One step outside the graph (one graph break, on the first call only)."""
    with torch.no_grad():
        host._eager_step()
    if host._needs_eager_call():
        return  # the next call is eager too (gradient accumulation buffered: the base has no state yet)
    for group in host.param_groups:
        if "capturable" in group:  # what dynamo sets in a traced step of a torch.optim base: no recompile for it
            group["capturable"] = True


def _any_of(flags: list[Tensor]) -> Tensor:
    return functools.reduce(operator.or_, flags)


def _all_of(flags: list[Tensor | None]) -> Tensor | None:
    """The conjunction of the given 0-dim bool tensors, None for none (None entries are True)."""
    chosen = [f for f in flags if f is not None]
    return functools.reduce(operator.and_, chosen) if chosen else None


def _product(factors: list[Any]) -> Any:
    """The product of the lr multipliers (floats or 0-dim tensors); 1.0 for none."""
    result: Any = 1.0
    for factor in factors:
        result = factor if isinstance(result, float) and result == 1.0 else result * factor
    return result


class _Gate:
    """Makes a traced call that must not apply a step change only what such a call changes.

    The traced step runs the base optimizer and every derivation on every call. A call that gradient
    accumulation only buffers (``ctx.applies`` False) must change nothing but its buffers; a call
    that a derivation's ``skip`` drops (``ctx.counts`` False) nothing at all. This keeps a copy of
    each tensor that the call may write (every parameter with a gradient or with state, and its
    state, all state of the parameters with a gradient being created first as the first step would)
    and of the derivations' group counters, and once the step is done puts them back where the call
    does not apply. State that the call itself creates (a foreign base's, EMA's of a parameter
    without a gradient) starts from zeros. The
    tensors in ``ctx.gate_exempt`` (the accumulation buffers) are left as the call wrote them unless
    the call does not count. The counters of the skipping derivations (``own``) are theirs to keep.
    """

    __slots__ = ("counters", "ctx", "host", "known", "saved")

    def __init__(self, host: DerivationHost, ctx: StepContext, own: set[str]) -> None:
        self.host = host
        self.ctx = ctx
        host._init_traced_state([p for _, p in ctx.params_with_gradient()])
        every = [p for g in host.param_groups for p in g["params"]]
        self.known = [(p, set(host.state.get(p, {}))) for p in every]  # .get: no entry made for a parameter without state
        params = [p for p in every if ctx.gradient(p) is not None or host.state.get(p)]
        self.saved: list[tuple[Tensor, Tensor]] = []
        for p in params:
            self.saved.append((p, p.detach().clone()))
            for value in host.state[p].values():
                if isinstance(value, Tensor) and (ctx.counts is not None or id(value) not in ctx.gate_exempt):
                    self.saved.append((value, value.clone()))
        keys = [key for d in host._danlu_derivations for key in d.counters if key not in own]
        self.counters = [(group, key, group[key]) for group in host.param_groups for key in keys if key in group]

    def close(self) -> None:
        ctx = self.ctx
        keep = _all_of([ctx.applies, ctx.counts])
        if keep is None:
            return
        exempt = ctx.gate_exempt
        for tensor, old in self.saved:
            if id(tensor) not in exempt:
                tensor.copy_(torch.where(keep, tensor, old))
            elif ctx.counts is not None:
                tensor.copy_(torch.where(ctx.counts, tensor, old))
        for p, keys in self.known:
            for key, value in self.host.state.get(p, {}).items():
                if key not in keys and isinstance(value, Tensor):
                    kept = ctx.counts if id(value) in exempt else keep
                    if kept is not None:
                        value.copy_(torch.where(kept, value, torch.zeros_like(value)))
        for group, key, old in self.counters:
            value = group[key]
            if isinstance(value, Tensor):
                group[key] = torch.where(keep, value, torch.as_tensor(old, dtype=value.dtype))


class _Undo:
    """What a failed step puts back, recorded cheaply before the step.

    Every error that danlu can foresee (bad gradients, misuse, a closure that raises) is raised
    before anything changes. For an error raised later (a base optimizer's arithmetic, an
    interrupt), this puts back the group entries (``lr``, the counters) and removes the state
    entries that the failed call created, such as Lookahead's slow weights of a first step.
    """

    __slots__ = ("groups", "host", "state_len")

    def __init__(self, host: DerivationHost) -> None:
        self.host = host
        self.groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in host.param_groups]
        self.state_len = len(host.state)

    def restore(self) -> None:
        for group, saved in zip(self.host.param_groups, self.groups):
            for key, value in saved.items():
                if group.get(key, value) is not value:
                    group[key] = value
        if len(self.host.state) > self.state_len:
            for p in list(self.host.state)[self.state_len :]:
                del self.host.state[p]
