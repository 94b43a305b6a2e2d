"""danlu's native driver: one kernel pass per step for every declared algorithm and the derivations fused into it.

:meth:`danlu.base.DanluOptimizer._group_step` hands each param group to :func:`group_step`, which runs
the tensors it can take through the native kernels (``danlu/_kernels.cpp``) and returns the others to
the pure-PyTorch path. The driver knows no optimizer or derivation: it reads their declarations
(:mod:`danlu._native_spec`):

* the optimizer's ``native`` (a :class:`~danlu._native_spec.NativeSpec`), taken from the class that
  defines the ``_update_single`` in use (a subclass that overrides it without declaring, such as
  ``LazyAdam``, keeps the generic path);
* each derivation's ``native``: a :class:`~danlu._native_spec.Fold` into ``d = A u + B p``, the
  :class:`~danlu._native_spec.TrustRatio` (two passes), an :class:`~danlu._native_spec.AfterStep`
  (Lookahead's sync, EMA), the :class:`~danlu._native_spec.AccumulationMean`,
  :class:`~danlu._native_spec.NoTensorWork`, :class:`~danlu._native_spec.Blocks` (its selected
  tensors take the generic path) or :class:`~danlu._native_spec.Surrounds` (its hooks run around the
  pass, and the after-steps declared outside it run in Python after its own). A derivation with a
  transform and no declaration keeps the whole stack on the generic path.

A tensor is taken when the native library loads (:mod:`danlu._native`), the group's ``foreach`` is
``None`` and it has no stochastic rounding, and the parameter, its gradient and its state are plain,
dense, contiguous CPU tensors of one dtype (float32 or float64). Its gradient scale
(``ctx.scales``) and a deferred accumulation mean (``ctx.pending_means``) are formed in the pass; the
gradient itself is never written.

A group's plan (pointers, sizes, folded transforms) is built once and reused while the tensors stay
the same, so a step costs a few numpy operations and one kernel call per group.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from danlu import _native
from danlu._native_spec import (
    AccumulationMean,
    AfterStep,
    Blocks,
    Col,
    Fold,
    Kernel,
    Mode,
    NativeSpec,
    NoTensorWork,
    Phase,
    Slot,
    Surrounds,
    TrustRatio,
)

if TYPE_CHECKING:
    from danlu._context import StepContext

__all__ = [
    "group_step",
    "steady_step",
    "defer_mean",
    "defer_group_means",
    "native_kind",
    "settle_gradients",
    "advance_steps",
    "spec_for",
    "scale_scalars",
    "STATS",
]

STATS = {"native_tensors": 0, "torch_fused_tensors": 0}
"""How many tensor updates the native kernels (and torch's fused Adam) have done in this process."""
NSLOT, NCOEF = int(Slot.NSLOT), int(Col.NCOEF)
_DTYPES = {torch.float32: 0, torch.float64: 1}
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_PLAIN_SET = frozenset(_PLAIN)
_DTYPE, _LAYOUT, _IS_CPU = operator.attrgetter("dtype"), operator.attrgetter("layout"), operator.attrgetter("is_cpu")
_APPLIED_STEPS = "applied_steps"  # the param-group counter of applied steps (danlu.derivations._base)
_increment_version = getattr(torch.autograd.graph, "increment_version", None)


# ------------------------------------------------------------------------------------ declarations


@dataclass(frozen=True)
class _Stack:
    """An optimizer class's declarations, read once."""

    spec: NativeSpec | None
    transforms: tuple[tuple[Any, Fold | TrustRatio], ...]  # (derivation, fusion), in the stack's order
    after: tuple[tuple[int, Any, AfterStep], ...]  # (index, derivation, fusion)
    blocks: tuple[Any, ...]
    ema_first: bool  # an EMA-mode after-step comes before a SYNC-mode one
    torch_fusable: bool  # torch's fused AdamW can take it (decay folds only, no trust ratio)
    volatile: frozenset[str]  # group keys that change from step to step and decide nothing of a plan


def _stack(opt: Any) -> _Stack:
    cls = type(opt)
    cached = cls.__dict__.get("_danlu_native_stack")
    if cached is None:
        cached = _read_stack(cls)
        cls._danlu_native_stack = cached
    return cached


def _read_stack(cls: type) -> _Stack:
    owner = next((c for c in cls.__mro__ if "_update_single" in c.__dict__), None)
    spec = owner.__dict__.get("native") if owner is not None else None
    transforms: list[tuple[Any, Fold | TrustRatio]] = []
    after: list[tuple[int, Any, AfterStep]] = []
    blocks: list[Any] = []
    fusable = True
    surrounded = False  # a Surrounds declared inside: the after-steps from here on see what it leaves
    for index, d in enumerate(getattr(cls, "_danlu_derivations", ())):
        fusion = getattr(d, "native", None)
        if isinstance(fusion, (Fold, TrustRatio)):
            transforms.append((d, fusion))
            fusable = fusable and isinstance(fusion, Fold)
        elif isinstance(fusion, AfterStep):
            if not surrounded:
                after.append((index, d, fusion))
        elif isinstance(fusion, Blocks):
            blocks.append(d)
        elif isinstance(fusion, Surrounds):
            surrounded = True
        elif not isinstance(fusion, (AccumulationMean, NoTensorWork)) and d.has_transform:
            spec, fusable = None, False  # a transform the kernels do not know
    modes = [f.mode for _, _, f in after]
    if len(set(modes)) != len(modes) or sum(isinstance(f, TrustRatio) for _, f in transforms) > 1:
        spec = None
    ema_first = Mode.EMA in modes and Mode.SYNC in modes and modes.index(Mode.EMA) < modes.index(Mode.SYNC)
    counters = {c for d in getattr(cls, "_danlu_derivations", ()) for c in getattr(d, "counters", ())}
    volatile = frozenset({"params", "param_names", "lr", _APPLIED_STEPS, "calls", *counters})
    return _Stack(spec, tuple(transforms), tuple(after), tuple(blocks), ema_first, fusable, volatile)


def spec_for(opt: Any) -> NativeSpec | None:
    """The native declaration of ``opt``'s algorithm, or None if its stack cannot run on the kernels."""
    return _stack(opt).spec


def native_kind(opt: Any, group: dict[str, Any]) -> str:
    """'native' if this group's tensors may take the native kernels, else 'foreach' or 'reference'."""
    if group.get("foreach") is False:
        return "reference"
    if group.get("stochastic_rounding"):
        return "foreach"  # the generic path owns the rounding of low-precision parameters
    if group.get("foreach") is True or spec_for(opt) is None or _is_compiling() or _native.load() is None:
        return "foreach"  # under torch.compile the traced torch ops are what the compiler wants
    return "native"


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


# ------------------------------------------------------------------------------------ tensor checks


def _dense_like(t: Tensor | None, p: Tensor) -> bool:
    """A plain (not a subclass such as DTensor), dense, contiguous tensor of p's dtype and device."""
    return (
        t is not None
        and type(t) in _PLAIN
        and t.layout is torch.strided
        and t.dtype == p.dtype
        and t.device == p.device
        and t.is_contiguous()
    )


def _param_ok(p: Tensor) -> bool:
    return type(p) in _PLAIN and p.device.type == "cpu" and p.dtype in _DTYPES and p.layout is torch.strided and p.is_contiguous()


def _blocked(stack: _Stack, group: dict[str, Any], name: str | None) -> bool:
    return any(d.selects(group, name) for d in stack.blocks)


def _adapted(stack: _Stack, group: dict[str, Any], name: str | None) -> bool:
    return any(isinstance(f, TrustRatio) and d.selects(group, name) for d, f in stack.transforms)


def defer_mean(opt: Any, ctx: StepContext, group: dict[str, Any], p: Tensor, buffer: Tensor, steps: int) -> bool:
    """Whether the mean of an accumulated gradient can be left to the kernel (then it is recorded)."""
    spec = spec_for(opt)
    if spec is None or not spec.accumulate or native_kind(opt, group) != "native":
        return False
    if not (_param_ok(p) and _dense_like(p.grad, p) and _dense_like(buffer, p)):
        return False
    if _blocked(_stack(opt), group, opt._param_name(group, p)):
        return False
    ctx.pending_means[id(p)] = (buffer, steps)
    return True


def defer_group_means(opt: Any, ctx: StepContext, group: dict[str, Any], key: str, steps: int) -> bool:
    """Whether every tensor of ``group`` can leave its accumulated mean (buffer ``state[p][key]``) to one steady pass.

    Then it is recorded once for the group (``ctx.pending_groups``): the group has a steady plan that
    takes all its tensors, every gradient is one the kernels read and every buffer is like its
    parameter, so the tensors are those :func:`defer_mean` would take one by one.
    """
    spec = spec_for(opt)
    if spec is None or not spec.accumulate or _is_compiling():
        return False
    plans = opt.__dict__.get(PLANS)
    plan = plans.get(id(group)) if plans else None
    if plan is None or plan.steady is None or native_kind(opt, group) != "native":
        return False
    found = plan.accumulation_buffers(group, key, ctx.group_gradients(group))
    if found is None:
        return False
    ctx.pending_groups[id(group)] = (*found, steps)
    return True


def _defer_per_tensor(ctx: StepContext, group: dict[str, Any]) -> None:
    """A group whose means were deferred for the steady pass takes the general path: defer them one by one."""
    entry = ctx.pending_groups.pop(id(group), None)
    if entry is not None:
        buffers, _, steps = entry
        ctx.pending_means.update(zip(map(id, group["params"]), zip(buffers, repeat(steps))))


def settle_gradients(ctx: StepContext, params: Sequence[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """The gradients of the tensors left to the generic path, with deferred means formed and scales applied.

    A mean deferred to the kernel is formed in its buffer (``(buffer + g) / k``), never in ``p.grad``.
    """
    out = list(grads)
    for i, p in enumerate(params):
        entry = ctx.pending_means.pop(id(p), None)
        if entry is not None:
            buffer, steps = entry
            out[i] = buffer.add_(out[i]).div_(steps).to(grads[i].dtype)
            ctx.cleanup.append(partial(_zero_after, buffer))
        scale = ctx.scales.get(id(p))
        if scale is not None:
            out[i] = out[i] * scale
    return out


def _zero_after(buffer: Tensor, failed: bool) -> None:
    """Clear an accumulation buffer that held a mean for the generic path, once the step has succeeded."""
    if not failed:
        buffer.zero_()


def advance_steps(opt: Any, group: dict[str, Any], steps_t: list[Tensor]) -> list[float]:
    """Add 1 to every step counter and return the new values (one native call when it can)."""
    lib = _native.load() if native_kind(opt, group) == "native" else None
    if lib is not None and len(steps_t) > 1 and all([t.dtype is torch.float32 and t.device.type == "cpu" and t.dim() == 0 for t in steps_t]):
        n = len(steps_t)
        ptrs = np.fromiter((t.data_ptr() for t in steps_t), dtype=np.int64, count=n)
        out = np.empty(n, dtype=np.float64)
        lib.danlu_increment(n, _addr(ptrs), _addr(out))
        return out.tolist()
    torch._foreach_add_(steps_t, 1.0)
    return torch.stack(steps_t).tolist() if len(steps_t) > 1 else [float(steps_t[0].item())]


# ------------------------------------------------------------------------------------ the step


def group_step(
    opt: Any,
    ctx: StepContext,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    names: list[str | None],
    lrs: list[float],
    steps: list[float],
) -> list[int]:
    """Run what the native kernels (or torch's fused Adam) can take; return the indices left to the generic path."""
    kind = native_kind(opt, group)
    everything = list(range(len(params)))
    if kind != "native":
        if kind == "foreach" and _torch_fused_allowed(opt, group):
            return _torch_fused_adam(opt, ctx, group, params, grads, states, names, lrs, steps, everything)
        return everything
    rest = _native_group_step(opt, ctx, group, params, grads, states, names, lrs, steps)
    if rest and _torch_fused_allowed(opt, group):  # CUDA tensors of an Adam stack
        return _torch_fused_adam(opt, ctx, group, params, grads, states, names, lrs, steps, rest)
    return rest


PLANS = "_danlu_fused_plans"


def _native_group_step(
    opt: Any,
    ctx: StepContext,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    names: list[str | None],
    lrs: list[float],
    steps: list[float],
) -> list[int]:
    stack = _stack(opt)
    plans = opt.__dict__.setdefault(PLANS, {})
    key = (_group_signature(stack, group), tuple(map(id, params)))
    plan = plans.get(id(group))
    if plan is None or plan.key != key or not plan.valid():
        plan = plans[id(group)] = _Plan(stack, group, key, params, states, names)
    chosen = plan.take(grads)
    if chosen is None:  # gradients the kernels cannot read this time (dtype, layout): rebuild the rows
        return list(range(len(params)))
    plan.run(ctx, group, params, states, lrs, steps)
    if plan.steady is None and not plan.rest and len(params) == len(group["params"]):
        plan.prepare_steady(group, states)
    return plan.rest


def steady_step(opt: Any, ctx: StepContext, group: dict[str, Any], lr_scale: float) -> bool:
    """The whole step of ``group`` if it is the same as the last one (every tensor native, same tensors).

    Then the step costs a few C-speed passes over the group's lists and one kernel call: no
    per-tensor Python. Returns False (nothing done) when anything differs; the caller then takes
    the general route.
    """
    plans = opt.__dict__.get(PLANS)
    plan = plans.get(id(group)) if plans else None
    if plan is not None and plan.steady is not None and not (ctx.replaced or ctx.pending_means or _is_compiling()):
        lib = _native.load()
        if lib is not None and plan.steady_run(lib, opt, ctx, group, lr_scale):
            return True
    _defer_per_tensor(ctx, group)
    return False


def _group_signature(stack: _Stack, group: dict[str, Any]) -> tuple[Any, ...]:
    """The options of a group that decide a plan (everything but the lr, the counters and the tensors)."""
    return tuple((k, repr(v)) for k, v in group.items() if k not in stack.volatile)


_Row = tuple[list[int], list[tuple[dict[str, Any], str, Tensor]], tuple[int, int], tuple[float, float, float, float], bool, dict[int, float]]
"""One tensor's kernel row: pointers, (state, key, tensor) checks, shape, folds (A, B, POST_A, POST_B), adapted, columns."""


def _ptr(t: Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _addr(array: Any) -> int:
    # raw addresses: numpy's ctypes.data_as keeps objects alive from call to call
    return int(array.__array_interface__["data"][0])


class _Plan:
    """Per-group kernel arguments that do not change from step to step: pointers, sizes, folded transforms."""

    def __init__(
        self,
        stack: _Stack,
        group: dict[str, Any],
        key: Any,
        params: list[Tensor],
        states: list[dict[str, Any]],
        names: list[str | None],
    ) -> None:
        spec = stack.spec
        assert spec is not None
        self.key = key
        self.stack = stack
        self.spec = spec
        self.rest: list[int] = []
        chosen: list[int] = []
        checks: list[tuple[dict[str, Any], str, Tensor]] = []
        rows: list[list[int]] = []
        shapes: list[tuple[int, int]] = []
        folds: list[tuple[float, float, float, float]] = []
        adapted: list[bool] = []
        overrides: list[dict[int, float]] = []
        dtype = params[0].dtype if params else None
        keys = tuple(spec.state_keys(group)) if spec.layout is None else ()
        for i, (p, state, name) in enumerate(zip(params, states, names)):
            entry = self._tensor(group, p, state, name, keys, dtype)
            if entry is None:
                self.rest.append(i)
                continue
            row, tensor_checks, shape, fold, is_adapted, columns = entry
            chosen.append(i)
            rows.append(row)
            checks.extend(tensor_checks)
            shapes.append(shape)
            folds.append(fold)
            adapted.append(is_adapted)
            overrides.append(columns)
        n = len(chosen)
        self.chosen = chosen
        self.params = [params[i] for i in chosen]
        self.ids = {id(p) for p in self.params}
        self.checks = checks
        self.dtype = _DTYPES.get(dtype, 0) if dtype is not None else 0
        self.ptrs = np.array(rows, dtype=np.int64).reshape(n, NSLOT)
        self.param_ptrs = self.ptrs[:, Slot.PARAM].copy()
        self.sizes = np.array(shapes, dtype=np.int64).reshape(n, 2)
        self.numel = np.ascontiguousarray(self.sizes[:, 0]) if spec.layout is None else self.sizes
        self.folds = np.array(folds, dtype=np.float64).reshape(n, 4)
        self.adapted = np.array(adapted, dtype=bool)
        self.has_adapted = bool(self.adapted.any())
        self.all_adapted = bool(self.adapted.all())
        override_cols = sorted({c for o in overrides for c in o})
        self.override_cols = override_cols
        self.override_vals = np.array([[o.get(c, 0.0) for c in override_cols] for o in overrides], dtype=np.float64)
        self.base_coef = np.zeros((n, NCOEF), dtype=np.float64)
        self.base_coef[:, Col.A] = self.folds[:, 0]
        self.base_coef[:, Col.POST_A] = self.folds[:, 2]
        self.base_coef[:, Col.GRAD_SCALE] = 1.0
        self.base_modes = np.zeros(n, dtype=np.int32)
        self.min_lr = next((f.min_lr for _, f in stack.transforms if isinstance(f, TrustRatio)), 0.0)
        self.grad_refs: list[weakref.ref[Tensor]] = []
        self.steady: list[Tensor] | None = None  # the group's tensors once a step took them all (steady_run)
        self.accum: tuple[str, list[Any], Any] | None = None  # (state key, buffers, their pointers), checked

    def _tensor(
        self,
        group: dict[str, Any],
        p: Tensor,
        state: dict[str, Any],
        name: str | None,
        keys: tuple[str | None, ...],
        dtype: torch.dtype | None,
    ) -> _Row | None:
        """The row of one tensor, or None if it takes the generic path."""
        stack, spec = self.stack, self.spec
        if not _param_ok(p) or p.dtype != dtype or _blocked(stack, group, name):
            return None
        is_adapted = _adapted(stack, group, name)
        if is_adapted and not spec.adapt:
            return None
        columns: dict[int, float] = {}
        if spec.layout is not None:
            layout = spec.layout(group, p, state, name)
            if layout is None:
                return None
            keys, slot_tensors, shape, columns = layout.keys, layout.states, layout.shape, dict(layout.columns)
        else:
            slot_tensors = tuple(state.get(k) if k is not None else None for k in keys)
            shape = (p.numel(), 0)
        if any(k is not None and not _dense_like(t, p) for k, t in zip(keys, slot_tensors)):
            return None
        row = [p.data_ptr(), 0, *(_ptr(t) for t in slot_tensors)]
        row += [0] * (NSLOT - len(row))
        checks = [(state, k, t) for k, t in zip(keys, slot_tensors) if k is not None and t is not None]
        for _, _, fusion in stack.after:
            t = state.get(fusion.state_key)
            if t is None and fusion.create:
                t = state[fusion.state_key] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not _dense_like(t, p):
                return None
            assert t is not None
            row[fusion.slot] = t.data_ptr()
            checks.append((state, fusion.state_key, t))
        return row, checks, shape, _fold(stack, group, name), is_adapted, columns

    def prepare_steady(self, group: dict[str, Any], states: list[dict[str, Any]]) -> None:
        """Keep what :meth:`steady_run` checks: the group's tensors, the step counters, every state entry."""
        counters = [state.get("step") for state in states]
        if not all(isinstance(t, Tensor) and t.dtype is torch.float32 and t.device.type == "cpu" and t.dim() == 0 for t in counters):
            return
        self.steady = list(group["params"])
        self.states = states
        self.counters = np.array([t.data_ptr() for t in counters], dtype=np.int64)  # type: ignore[union-attr]
        entries = [*self.checks, *((state, "step", t) for state, t in zip(states, counters))]
        self.check_dicts = [e[0] for e in entries]
        self.check_keys = [e[1] for e in entries]
        self.check_values = [e[2] for e in entries]

    def steady_run(self, lib: Any, opt: Any, ctx: StepContext, group: dict[str, Any], lr_scale: float) -> bool:
        params = group["params"]
        steady = self.steady
        assert steady is not None
        if len(params) != len(steady) or not all(map(operator.is_, params, steady)) or _group_signature(self.stack, group) != self.key[0]:
            return False
        grads = ctx.group_gradients(group)
        if not all(map(operator.is_not, grads, repeat(None))):
            return False
        n = len(params)
        if all(map(operator.is_, grads, map(weakref.ref.__call__, self.grad_refs))):  # the same gradient tensors
            grad_ptrs = np.fromiter(map(Tensor.data_ptr, grads), dtype=np.int64, count=n)
            if not np.array_equal(grad_ptrs, self.ptrs[:, Slot.GRAD]):
                self.ptrs[:, Slot.GRAD] = grad_ptrs
        elif self.take(grads) is None:
            return False
        if not self.valid():
            return False
        accum = ctx.pending_groups.pop(id(group), None)
        values = np.empty(n, dtype=np.float64)
        lib.danlu_increment(n, _addr(self.counters), _addr(values))
        steps = values.tolist()
        states = self.states
        if values.min() == values.max():
            lrs = [opt._effective_lr(group, states[0], steps[0]) * lr_scale] * n
        else:
            by_step: dict[float, float] = {}
            lrs = [by_step.setdefault(t, opt._effective_lr(group, state, t) * lr_scale) for state, t in zip(states, steps)]
        self.run(ctx, group, params, states, lrs, steps, accum)
        return True

    def accumulation_buffers(self, group: dict[str, Any], key: str, grads: list[Any]) -> tuple[list[Any], Any] | None:
        """The buffers ``state[p][key]`` of the steady tensors and their pointers, if the kernels take them all."""
        steady = self.steady
        assert steady is not None
        params = group["params"]
        if len(params) != len(steady) or not all(map(operator.is_, params, steady)):
            return None
        if not all(map(operator.is_not, grads, repeat(None))):
            return None
        if not all(map(operator.is_, grads, map(weakref.ref.__call__, self.grad_refs))) and self.take(grads) is None:
            return None
        buffers: list[Any] = list(map(dict.get, self.states, repeat(key)))
        cached = self.accum
        # checked as the other state entries are: by identity
        if cached is None or cached[0] != key or not all(map(operator.is_, buffers, cached[1])):
            if not all(map(_dense_like, buffers, self.params)):
                return None
            cached = self.accum = (key, buffers, np.fromiter(map(Tensor.data_ptr, buffers), dtype=np.int64, count=len(buffers)))
        return cached[1], cached[2]

    def valid(self) -> bool:
        ptrs = np.fromiter(map(Tensor.data_ptr, self.params), dtype=np.int64, count=len(self.params))
        if not np.array_equal(ptrs, self.param_ptrs):
            return False
        if self.steady is not None:
            return all(map(operator.is_, map(dict.get, self.check_dicts, self.check_keys), self.check_values))
        return all([st.get(k) is t for st, k, t in self.checks])

    def take(self, grads: list[Tensor]) -> list[int] | None:
        """Point the rows at this step's gradients; None if one of them cannot be read by the kernels."""
        chosen = [grads[i] for i in self.chosen] if len(self.chosen) != len(grads) else grads
        if chosen and not self._readable(chosen):
            return None
        self.grad_refs = list(map(weakref.ref, chosen))  # weak: a step must not keep old gradients alive
        self.ptrs[:, Slot.GRAD] = np.fromiter(map(Tensor.data_ptr, chosen), dtype=np.int64, count=len(chosen))
        return self.chosen

    def _readable(self, grads: list[Tensor]) -> bool:
        """Whether the kernels read these gradients of the chosen tensors: plain, dense, contiguous CPU ones of their dtype."""
        return (
            set(map(type, grads)) <= _PLAIN_SET
            and set(map(_DTYPE, grads)) == {self.params[0].dtype}
            and set(map(_LAYOUT, grads)) == {torch.strided}
            and all(map(_IS_CPU, grads))
            and all(map(Tensor.is_contiguous, grads))
        )

    def run(
        self,
        ctx: StepContext,
        group: dict[str, Any],
        params: list[Tensor],
        states: list[dict[str, Any]],
        lrs: list[float],
        steps: list[float],
        accum: tuple[list[Any], Any, int] | None = None,
    ) -> None:
        """One kernel call for the chosen tensors; ``accum`` (buffers, pointers, k): every row forms its accumulated mean."""
        n = len(self.chosen)
        if n == 0:
            return
        lib = _native.load()
        modes = self.base_modes.copy()
        for _, _, fusion in self.stack.after:
            if fusion.active(group):
                modes |= int(fusion.mode)
        if self.stack.ema_first:
            modes |= int(Mode.EMA_FIRST)
        coef = self.base_coef.copy()
        for _, _, fusion in self.stack.after:
            coef[:, fusion.column] = fusion.weight(group)
        touched = self._pending(ctx, modes, coef)
        if accum is not None:
            self.ptrs[:, Slot.ACCUM] = accum[1]
            modes |= int(Mode.ACCUM)
            coef[:, Col.ACCUM_K] = accum[2]
            touched = True
        if ctx.scales:
            for row, p in enumerate(self.params):
                scale = ctx.scales.get(id(p))
                if scale is not None:
                    coef[row, Col.GRAD_SCALE] = float(scale)
        lr_col = self._algorithm_columns(coef, group, states, lrs, steps)
        coef[:, Col.B] = lr_col * self.folds[:, 1]  # folded at lr = 1: B and POST_B scale with the lr
        coef[:, Col.POST_B] = lr_col * self.folds[:, 3]
        coef[:, Col.LR] = np.maximum(lr_col, self.min_lr)
        threads = torch.get_num_threads()
        ptrs = self.ptrs
        if self.has_adapted and not self.all_adapted:
            for mask, phase in ((~self.adapted, Phase.FULL), (self.adapted, Phase.ADAPT)):
                self._launch(lib, phase, threads, ptrs[mask], self.numel[mask], coef[mask], modes[mask])
        else:
            self._launch(lib, Phase.ADAPT if self.has_adapted else Phase.FULL, threads, ptrs, self.numel, coef, modes)
        if touched:
            self.ptrs[:, Slot.ACCUM] = 0
        if _increment_version is not None:
            _increment_version(self.params)
        STATS["native_tensors"] += n
        for index, _, _ in self.stack.after:
            ctx.fused_after[(index, id(group))] = self.ids

    def _pending(self, ctx: StepContext, modes: Any, coef: Any) -> bool:
        """Rows whose accumulated mean the pass forms (buffer pointer, k, the ACCUM bit)."""
        pending = ctx.pending_means
        if not pending:
            return False
        found = False
        for row, p in enumerate(self.params):
            entry = pending.pop(id(p), None)
            if entry is None:
                continue
            buffer, k = entry
            self.ptrs[row, Slot.ACCUM] = buffer.data_ptr()
            modes[row] |= int(Mode.ACCUM)
            coef[row, Col.ACCUM_K] = k
            found = True
        return found

    def _algorithm_columns(
        self, coef: Any, group: dict[str, Any], states: list[dict[str, Any]], lrs: list[float], steps: list[float]
    ) -> Any:
        """Fill columns 0-9 from the declaration; return the lr of each row (a float when uniform)."""
        chosen = self.chosen
        spec = self.spec
        lr_c = [lrs[i] for i in chosen] if len(chosen) != len(lrs) else lrs
        step_c = [steps[i] for i in chosen] if len(chosen) != len(steps) else steps
        first_lr, first_step = lr_c[0], step_c[0]
        uniform = lr_c.count(first_lr) == len(lr_c) and step_c.count(first_step) == len(step_c)
        if spec.rows is not None:
            values = np.asarray(spec.rows(group, [states[i] for i in chosen], lr_c, step_c), dtype=np.float64)
            coef[:, : values.shape[1]] = values
        elif uniform:
            row = spec.coefficients(group, states[chosen[0]], first_lr, first_step)
            coef[:, : len(row)] = row
        else:
            cache: dict[tuple[float, float], Sequence[float]] = {}
            for r, key in enumerate(zip(lr_c, step_c)):
                if key not in cache:
                    cache[key] = spec.coefficients(group, states[chosen[r]], key[0], key[1])
                coef[r, : len(cache[key])] = cache[key]
        if self.override_cols:
            coef[:, self.override_cols] = self.override_vals
        return first_lr if uniform else np.array(lr_c, dtype=np.float64)

    def _launch(self, lib: Any, phase: Phase, threads: int, ptrs: Any, numel: Any, coef: Any, modes: Any) -> None:
        ptrs, numel, coef, modes = (np.ascontiguousarray(x) for x in (ptrs, numel, coef, modes))
        n = len(modes)
        if n == 0:
            return
        if self.spec.kernel == Kernel.ADAFACTOR:
            rc = lib.danlu_adafactor(self.dtype, n, _addr(numel), _addr(ptrs), _addr(coef), _addr(modes), threads)
        else:
            red = np.zeros(2 * n, dtype=np.float64)
            rc = lib.danlu_elementwise(
                self.dtype, int(self.spec.kernel), n, _addr(numel), _addr(ptrs), _addr(coef), _addr(modes), int(phase), threads, _addr(red)
            )
        if rc != 0:  # pragma: no cover - the Python side only sends what the library knows
            raise RuntimeError(f"danlu native kernel failed ({rc})")


def _fold(stack: _Stack, group: dict[str, Any], name: str | None) -> tuple[float, float, float, float]:
    """(A, B) of the folds before the trust ratio and (POST_A, POST_B) of those after it, at lr = 1."""
    a, b = 1.0, 0.0
    post: list[float] | None = None
    for d, fusion in stack.transforms:
        if not d.has_transform or not d.selects(group, name):
            continue
        if isinstance(fusion, TrustRatio):
            post = [1.0, 0.0]
            continue
        fa, fb = fusion.fold(group, name)
        if post is None:
            a, b = fa * a, fa * b + fb
        else:
            post = [fa * post[0], fa * post[1] + fb]
    m, w = post if post is not None else (1.0, 0.0)
    return a, b, m, w


# ------------------------------------------------------------------------------------ torch's fused Adam


def _torch_fused_allowed(opt: Any, group: dict[str, Any]) -> bool:
    """torch's fused Adam kernels take Adam stacks whose transforms are at most decoupled weight decay."""
    spec = spec_for(opt)
    if spec is None or not spec.torch_fused or group.get("foreach") is not None or group.get("stochastic_rounding"):
        return False
    return _stack(opt).torch_fusable and not _is_compiling() and hasattr(torch, "_fused_adamw_")


def _torch_fused_adam(
    opt: Any,
    ctx: StepContext,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    names: list[str | None],
    lrs: list[float],
    steps: list[float],
    indices: list[int],
) -> list[int]:
    """Adam / AdamW through ``torch._fused_adamw_`` (CUDA, or a CPU without the native library).

    The math is the same: bert4keras' Adam puts eps outside sqrt(v_hat) as torch does, and the
    decoupled decay ``p - lr_t * rate * p_old`` is torch's AdamW decay. ``bias_correction=False`` runs
    the kernel with step counters at +inf (``beta ** inf == 0``). The step counters danlu keeps (float32
    scalars, already advanced; the kernel does not advance them) are handed over as device copies.
    Lookahead and EMA run after it in their own passes; tensors with a gradient scale or a deferred
    accumulation mean, or selected by a fold other than decay or by a blocking derivation, stay on the
    generic path.
    """
    stack = _stack(opt)
    assert stack.spec is not None
    m_key, v_key = (str(k) for k in stack.spec.state_keys(group)[:2])
    beta1, beta2 = group["betas"]
    buckets: dict[tuple[Any, ...], list[int]] = {}
    rest: list[int] = []
    for i in indices:
        p, grad, state, name = params[i], grads[i], states[i], names[i]
        a, b, _, _ = _fold(stack, group, name)
        ok = (
            type(p) in _PLAIN
            and p.dtype in _DTYPES
            and p.layout is torch.strided
            and p.is_contiguous()  # torch's fused kernels read the parameter as one dense block
            and _dense_like(grad, p)
            and _dense_like(state.get(m_key), p)
            and _dense_like(state.get(v_key), p)
            and a == 1.0
            and id(p) not in ctx.scales
            and id(p) not in ctx.pending_means
            and not _blocked(stack, group, name)
        )
        if not ok:
            rest.append(i)
            continue
        buckets.setdefault((p.device, p.dtype, -b, lrs[i]), []).append(i)
    for (device, _, rate, lr), members in buckets.items():
        step_values = [steps[i] for i in members] if group["bias_correction"] else [math.inf] * len(members)
        step_t = list(torch.tensor(step_values, dtype=torch.float32, device=device).unbind())
        torch._fused_adamw_(
            [params[i] for i in members],
            [grads[i] for i in members],
            [states[i][m_key] for i in members],
            [states[i][v_key] for i in members],
            [],
            step_t,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=rate,
            eps=group["eps"],
            amsgrad=False,
            maximize=False,
        )
        STATS["torch_fused_tensors"] += len(members)
    return rest


# ------------------------------------------------------------------------------------ scalars


def scale_scalars(scalars: list[Tensor], factors: list[float] | float) -> Any:
    """Multiply each float64 CPU scalar in place by its factor (as ``mul_``); return the new values (numpy), or None.

    None (nothing done) where the kernels are not loaded or a scalar is not a plain 0-dim float64 CPU tensor.
    """
    n = len(scalars)
    lib = _native.load() if n and not _is_compiling() else None
    if lib is None or not (
        set(map(type, scalars)) <= _PLAIN_SET
        and set(map(_DTYPE, scalars)) == {torch.float64}
        and all(map(_IS_CPU, scalars))
        and not any(map(Tensor.dim, scalars))
    ):
        return None
    ptrs = np.fromiter(map(Tensor.data_ptr, scalars), dtype=np.int64, count=n)
    scale = np.full(n, factors, dtype=np.float64) if isinstance(factors, float) else np.asarray(factors, dtype=np.float64)
    out = np.empty(n, dtype=np.float64)
    lib.danlu_scale(n, _addr(ptrs), _addr(scale), _addr(out))
    return out
