"""danlu's fast path: one native pass per step for every base optimizer and the derivations fused into it.

:meth:`danlu.base.DanluOptimizer._group_step` hands each param group to :func:`group_step`, which runs
the tensors it can take through the native kernels (``danlu/_kernels.cpp``) and returns the others to
the pure-PyTorch path. A tensor is taken when

* the native library loads (:mod:`danlu._native`), the group's ``foreach`` is ``None`` (the default;
  ``True`` asks for the ``torch._foreach_*`` path, ``False`` for the per-tensor reference loop);
* the optimizer's per-tensor reference (``_update_single``) is the one the kernel implements (a
  subclass that overrides it, such as ``LazyAdam``, keeps the generic path);
* the parameter, its gradient and its state are dense, contiguous, on the CPU, float32 or float64, of
  one dtype; Adafactor also needs a factored tensor to be 2-D;
* every derivation of the stack is one the kernel knows, and lazy optimization does not select it.

The derivations are fused as follows (see the header of ``_kernels.cpp``):

* weight decay, parameter-wise lr and the trust ratio of layer adaptation fold, in the stack's order,
  into two coefficients ``d = A u + B p`` of the algorithm's update ``u``; layer adaptation takes two
  passes (norms first, then the write), the only derivation that needs a second look at the data;
* Lookahead's sync and the EMA update run in the same pass, after the new parameter is computed, and
  the host skips their ``after_step`` for the tensors done here;
* gradient accumulation's applying call averages the buffered gradient inside the pass (the host's
  ``accumulate`` defers the mean to the kernel, see :func:`defer_mean`).

Nothing parameter-sized is allocated: the kernels work in L1-sized blocks.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from danlu import _native
from danlu.derivations import (
    ExponentialMovingAverage,
    GradientAccumulation,
    LayerAdaptation,
    LazyOptimization,
    Lookahead,
    ParameterWiseLR,
    PiecewiseLinearLR,
    SkipNonfinite,
    WeightDecay,
)
from danlu.derivations._base import APPLIED_STEPS, matches_any

if TYPE_CHECKING:
    from danlu._context import StepContext
    from danlu.base import DanluOptimizer

__all__ = ["group_step", "defer_mean", "native_kind", "settle_gradients"]

STATS = {"native_tensors": 0, "torch_fused_tensors": 0}
"""How many tensor updates the native kernels have done in this process (for tests and the benchmark)."""
M_ACCUM, M_SYNC, M_EMA, M_EMA_FIRST = 1, 2, 4, 8
PH_FULL, PH_NORM, PH_APPLY, PH_ADAPT = 0, 1, 2, 3
NSLOT, NCOEF = 8, 20
_DTYPES = {torch.float32: 0, torch.float64: 1}
_KNOWN = (
    WeightDecay,
    LayerAdaptation,
    PiecewiseLinearLR,
    GradientAccumulation,
    Lookahead,
    LazyOptimization,
    ExponentialMovingAverage,
    ParameterWiseLR,
    SkipNonfinite,
)
_increment_version = getattr(torch.autograd.graph, "increment_version", None)


@dataclass(frozen=True)
class Spec:
    """How one of danlu's algorithms maps onto the kernels."""

    alg: int  # -1: Adafactor
    slots: Callable[[dict[str, Any]], tuple[str | None, str | None, str | None]]
    coefficients: Callable[[Any, dict[str, Any], dict[str, Any], float, float], list[float]]
    accumulate: bool = True  # can average an accumulated gradient in its pass


def _sgd_coefficients(opt: Any, group: dict[str, Any], state: dict[str, Any], lr: float, step: float) -> list[float]:
    momentum = group["momentum"]
    return [float(momentum != 0), momentum, 1 - group["dampening"], float(group["nesterov"]), float(step == 1), -lr]


def _adam_coefficients(opt: Any, group: dict[str, Any], state: dict[str, Any], lr: float, step: float) -> list[float]:
    beta1, beta2 = group["betas"]
    correction1, sqrt_correction2 = opt._corrections(group, step)
    return [1 - beta1, beta2, 1 - beta2, sqrt_correction2, group["eps"], -lr / correction1]


def _nadam_coefficients(opt: Any, group: dict[str, Any], state: dict[str, Any], lr: float, step: float) -> list[float]:
    beta1, beta2 = group["betas"]
    grad_coef, momentum_coef, sqrt_correction2 = opt._coefficients(group, state, lr, step)
    return [1 - beta1, beta2, 1 - beta2, sqrt_correction2, group["eps"], grad_coef, momentum_coef]


def _radam_coefficients(opt: Any, group: dict[str, Any], state: dict[str, Any], lr: float, step: float) -> list[float]:
    beta1, beta2 = group["betas"]
    scale = -lr / (1 - beta1**step)
    adaptive = opt._rectification(group, step)
    rectified = adaptive is not None
    return [1 - beta1, beta2, 1 - beta2, float(rectified), group["eps"], scale, scale * adaptive if rectified else 0.0]


def _rmsprop_slots(group: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    return (
        "square_avg",
        "momentum_buffer" if group["momentum"] > 0 else None,
        "grad_avg" if group["centered"] else None,
    )


def _build_specs() -> dict[type, Spec]:
    from danlu.optimizers import SGD, Adadelta, Adafactor, Adagrad, Adam, Lion, NAdam, RAdam, RMSprop

    return {
        SGD: Spec(0, lambda g: ("momentum_buffer" if g["momentum"] != 0 else None, None, None), _sgd_coefficients),
        Adagrad: Spec(1, lambda g: ("sum", None, None), lambda o, g, s, lr, t: [-lr, g["eps"]]),
        Adadelta: Spec(
            2, lambda g: ("square_avg", "acc_delta", None), lambda o, g, s, lr, t: [g["rho"], 1 - g["rho"], g["eps"], -lr]
        ),
        RMSprop: Spec(
            3,
            _rmsprop_slots,
            lambda o, g, s, lr, t: [
                g["alpha"],
                1 - g["alpha"],
                g["eps"],
                -lr,
                float(g["centered"]),
                float(g["momentum"] > 0),
                g["momentum"],
            ],
        ),
        Adam: Spec(4, lambda g: ("exp_avg", "exp_avg_sq", None), _adam_coefficients),
        NAdam: Spec(5, lambda g: ("exp_avg", "exp_avg_sq", None), _nadam_coefficients),
        RAdam: Spec(6, lambda g: ("exp_avg", "exp_avg_sq", None), _radam_coefficients),
        Lion: Spec(7, lambda g: ("exp_avg", None, None), lambda o, g, s, lr, t: [1 - g["betas"][0], 1 - g["betas"][1], -lr]),
        Adafactor: Spec(-1, lambda g: (None, None, None), lambda o, g, s, lr, t: [], accumulate=False),
    }


SPECS: dict[type, Spec] = {}


def spec_for(opt: Any) -> Spec | None:
    """The kernel spec of ``opt``'s algorithm, or None if its reference update is not one the kernels implement."""
    cls = type(opt)
    cached = cls.__dict__.get("_danlu_spec_cache")
    if cached is not None:
        return cached[0]
    if not SPECS:
        SPECS.update(_build_specs())
    found = None
    for base, spec in SPECS.items():
        if issubclass(cls, base) and getattr(cls, "_update_single", None) is getattr(base, "_update_single", None):
            found = spec
            break
    if found is not None and any(type(d) not in _KNOWN for d in getattr(cls, "_danlu_derivations", ())):
        found = None
    cls._danlu_spec_cache = (found,)
    return found


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


_PLAIN = (torch.Tensor, torch.nn.Parameter)


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


def _param_ok(p: Tensor, grad: Tensor | None) -> bool:
    return (
        type(p) in _PLAIN
        and p.device.type == "cpu"
        and p.dtype in _DTYPES
        and p.layout is torch.strided
        and p.is_contiguous()
        and _dense_like(grad, p)
    )


def _lazy_selects(opt: Any, group: dict[str, Any], name: str | None) -> bool:
    return any(isinstance(d, LazyOptimization) and d.selects(group, name) for d in opt._danlu_derivations)


def _layer_adapted(opt: Any, group: dict[str, Any], name: str | None) -> bool:
    return any(isinstance(d, LayerAdaptation) and d.selects(group, name) for d in opt._danlu_derivations)


def defer_mean(opt: Any, ctx: StepContext, group: dict[str, Any], p: Tensor, buffer: Tensor, steps: int) -> bool:
    """Whether the mean of an accumulated gradient can be left to the kernel (then it is recorded)."""
    spec = spec_for(opt)
    if spec is None or not spec.accumulate or native_kind(opt, group) != "native":
        return False
    if not (_param_ok(p, p.grad) and _dense_like(buffer, p)):
        return False
    name = opt._param_name(group, p)
    if _lazy_selects(opt, group, name) or _layer_adapted(opt, group, name):
        return False
    ctx.pending_means[id(p)] = (buffer, steps)
    return True


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
        scale = ctx.scales.get(id(p))
        if scale is not None:
            out[i] = out[i] * scale
    return out


def _fold(opt: Any, group: dict[str, Any], name: str | None, lr: float) -> tuple[float, float, list[tuple[str, float]]]:
    """(A, B) of the transforms before layer adaptation, and the ops after it ('wd' adds to B, 'mul' scales both)."""
    a, b = 1.0, 0.0
    post: list[tuple[str, float]] | None = None
    for d in opt._danlu_derivations:
        if not d.has_transform or not d.selects(group, name):
            continue
        if isinstance(d, LayerAdaptation):
            post = []
            continue
        if isinstance(d, WeightDecay):
            op = ("wd", -lr * group["weight_decay_rate"])
        elif isinstance(d, ParameterWiseLR):
            op = ("mul", float(d.multiplier(group, name)))  # type: ignore[arg-type]
        else:  # pragma: no cover - filtered by the eligibility checks
            raise AssertionError(type(d))
        if post is not None:
            post.append(op)
        elif op[0] == "wd":
            b += op[1]
        else:
            a, b = a * op[1], b * op[1]
    return a, b, post if post is not None else []


def _apply_post(a: float, b: float, post: list[tuple[str, float]]) -> tuple[float, float]:
    for kind, value in post:
        if kind == "wd":
            b += value
        else:
            a, b = a * value, b * value
    return a, b


class _Batch:
    """ctypes arrays for one kernel call."""

    def __init__(self) -> None:
        self.numel: list[int] = []
        self.ptrs: list[int] = []
        self.coef: list[float] = []
        self.modes: list[int] = []
        self.tensors: list[Tensor] = []

    def add(self, sizes: list[int], ptrs: list[int], coef: list[float], mode: int, touched: list[Tensor]) -> None:
        self.numel.extend(sizes)
        self.ptrs.extend(ptrs)
        self.coef.extend(coef)
        self.modes.append(mode)
        self.tensors.extend(touched)

    def arrays(self) -> tuple[Any, ...]:
        n = len(self.modes)
        return (
            (ctypes.c_int64 * len(self.numel))(*self.numel),
            (ctypes.c_void_p * (n * NSLOT))(*self.ptrs),
            (ctypes.c_double * (n * NCOEF))(*self.coef),
            (ctypes.c_int * n)(*self.modes),
            (ctypes.c_double * (2 * n))(),
        )


def _ptr(t: Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _generic_group_step(
    opt: DanluOptimizer,
    ctx: StepContext,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    names: list[str | None],
    lrs: list[float],
    steps: list[float],
) -> list[int]:
    """Per-tensor assembly of the kernel arguments (Adafactor, NAdam, and whenever a plan does not fit)."""
    lib = _native.load()
    spec = spec_for(opt)
    assert lib is not None and spec is not None
    derivations = opt._danlu_derivations
    pending = ctx.pending_means
    slot_keys = spec.slots(group)

    # the after-step work fused into the pass, in the stack's order
    sync = ema = ema_first = False
    alpha = ema_weight = 0.0
    after_index: list[int] = []
    seen_lookahead = False
    for index, d in enumerate(derivations):
        if isinstance(d, Lookahead):
            seen_lookahead = True
            after_index.append(index)
            sync = (group[APPLIED_STEPS] + 1) % group["steps_per_slow_update"] == 0
            alpha = group["slow_step_size"]
        elif isinstance(d, ExponentialMovingAverage):
            after_index.append(index)
            ema, ema_first = True, not seen_lookahead
            ema_weight = 1.0 - group["ema_momentum"]
    base_mode = (M_SYNC if sync else 0) | (M_EMA if ema else 0) | (M_EMA_FIRST if ema and ema_first else 0)

    rest: list[int] = []
    single, adapted_batch = _Batch(), _Batch()
    done: list[Tensor] = []
    coef_cache: dict[tuple[float, float], list[float]] = {}
    dtype = None
    for i, (p, grad, state, name) in enumerate(zip(params, grads, states, names)):
        if dtype is None:
            dtype = p.dtype
        if not _param_ok(p, grad) or p.dtype != dtype or _lazy_selects(opt, group, name):
            rest.append(i)
            continue
        if spec.alg < 0:
            entry = _adafactor_entry(opt, group, p, state, lrs[i], steps[i])
            if entry is None or _layer_adapted(opt, group, name):
                rest.append(i)
                continue
            slots, coef, sizes, momentum = entry
        else:
            s = [state.get(k) if k is not None else None for k in slot_keys]
            if any(k is not None and not _dense_like(t, p) for k, t in zip(slot_keys, s)):
                rest.append(i)
                continue
            slots = [p, grad, *s]
            if spec.alg == 5:  # NAdam advances mu_product: once per tensor and step
                coef = spec.coefficients(opt, group, state, lrs[i], steps[i])
            else:
                key = (lrs[i], steps[i])
                cached = coef_cache.get(key)
                if cached is None:
                    cached = coef_cache[key] = spec.coefficients(opt, group, state, lrs[i], steps[i])
                coef = cached
            sizes = [p.numel()]
            momentum = None
        mode = base_mode
        extra: list[Tensor | None] = [momentum, None, None]  # Adafactor's momentum rides in the accumulation slot
        accum = pending.pop(id(p), None)
        if accum is not None:
            mode |= M_ACCUM
            extra[0] = accum[0]
        if sync:
            extra[1] = state["lookahead.slow"]
        if ema:
            shadow = state.get("ema.shadow")
            if shadow is None:
                shadow = state["ema.shadow"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            extra[2] = shadow
        a, b, post = _fold(opt, group, name, lrs[i])
        post_a, post_b = _apply_post(1.0, 0.0, post)  # the transforms after layer adaptation: A -> A M, B -> B M + W
        full = [
            *coef,
            *([0.0] * (10 - len(coef))),
            a,
            b,
            float(accum[1]) if accum else 1.0,
            alpha,
            ema_weight,
            post_a,
            post_b,
            lrs[i],
            0.0,
            0.0,
        ]
        ptrs = [_ptr(t) for t in slots] + [_ptr(t) for t in extra]
        touched = [t for t in (*slots, *extra) if t is not None]
        if _layer_adapted(opt, group, name):
            adapted_batch.add(sizes, ptrs, full, mode, touched)
        else:
            single.add(sizes, ptrs, full, mode, touched)
        done.append(p)

    threads = torch.get_num_threads()
    dt = _DTYPES.get(dtype, 0) if dtype is not None else 0
    if single.modes:
        _call(lib, spec, dt, single, PH_FULL, threads)
    if adapted_batch.modes:
        _call(lib, spec, dt, adapted_batch, PH_ADAPT, threads)
    STATS["native_tensors"] += len(done)
    if done and after_index:
        ids = {id(p) for p in done}
        for index in after_index:
            ctx.fused_after[(index, id(group))] = ids
    return rest


PLANS = "_danlu_fused_plans"


def advance_steps(opt: Any, group: dict[str, Any], steps_t: list[Tensor]) -> list[float]:
    """Add 1 to every step counter and return the new values (one native call when it can)."""
    lib = _native.load() if native_kind(opt, group) == "native" else None
    if (
        lib is not None
        and len(steps_t) > 1
        and all(t.dtype is torch.float32 and t.device.type == "cpu" and t.dim() == 0 for t in steps_t)
    ):
        n = len(steps_t)
        out = (ctypes.c_double * n)()
        lib.danlu_increment(n, (ctypes.c_void_p * n)(*[t.data_ptr() for t in steps_t]), out)
        return list(out)
    torch._foreach_add_(steps_t, 1.0)
    return torch.stack(steps_t).tolist() if len(steps_t) > 1 else [float(steps_t[0].item())]


def group_step(
    opt: DanluOptimizer,
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
    if ctx.scales:  # scaled gradients (clipping) take the generic path
        return list(range(len(params)))
    if kind != "native":
        if kind == "foreach" and _torch_fused_allowed(opt, group):
            return _torch_fused_adam(opt, group, params, grads, states, names, lrs, steps, list(range(len(params))))
        return list(range(len(params)))
    rest = _native_group_step(opt, ctx, group, params, grads, states, names, lrs, steps)
    if rest and _torch_fused_allowed(opt, group):  # CUDA tensors of an Adam stack
        return _torch_fused_adam(opt, group, params, grads, states, names, lrs, steps, rest)
    return rest


def _native_group_step(
    opt: DanluOptimizer,
    ctx: StepContext,
    group: dict[str, Any],
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    names: list[str | None],
    lrs: list[float],
    steps: list[float],
) -> list[int]:
    spec = spec_for(opt)
    assert spec is not None
    plans = opt.__dict__.setdefault(PLANS, {})
    key = (_group_signature(group), tuple(map(id, params)))
    plan = plans.get(id(group))
    if plan is None or plan.key != key or not plan.valid(params, states):
        plan = plans[id(group)] = _Plan(opt, group, spec, key, params, states, names)
    if not plan.grads_ok(grads):
        return _generic_group_step(opt, ctx, group, params, grads, states, names, lrs, steps)
    plan.run(opt, ctx, group, spec, params, grads, states, lrs, steps)
    return plan.rest


def _torch_fused_allowed(opt: Any, group: dict[str, Any]) -> bool:
    """torch's fused Adam kernels take Adam stacks whose transforms are at most decoupled weight decay."""
    spec = spec_for(opt)
    if spec is None or spec.alg != 4 or group.get("foreach") is not None or group.get("stochastic_rounding") or _is_compiling():
        return False
    if not hasattr(torch, "_fused_adamw_"):
        return False
    return all(
        isinstance(
            d,
            (
                WeightDecay,
                PiecewiseLinearLR,
                GradientAccumulation,
                Lookahead,
                ExponentialMovingAverage,
                LazyOptimization,
                ParameterWiseLR,
                SkipNonfinite,
            ),
        )
        for d in opt._danlu_derivations
    )


def _torch_fused_adam(
    opt: Any,
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
    scalars, already advanced; the kernel does not advance them) are handed over as device copies. Lookahead and EMA run after
    it in their own passes; parameters selected by layer adaptation, lazy optimization or a parameter-
    wise lr stay on the generic path.
    """
    beta1, beta2 = group["betas"]
    wd = next((d for d in opt._danlu_derivations if isinstance(d, WeightDecay)), None)
    buckets: dict[tuple[Any, ...], list[int]] = {}
    rest: list[int] = []
    for i in indices:
        p, grad, state, name = params[i], grads[i], states[i], names[i]
        m, v = state.get("exp_avg"), state.get("exp_avg_sq")
        ok = (
            type(p) in _PLAIN
            and p.dtype in _DTYPES
            and p.layout is torch.strided
            and p.is_contiguous()  # torch's fused kernels read the parameter as one dense block
            and _dense_like(grad, p)
            and _dense_like(m, p)
            and _dense_like(v, p)
            and not _lazy_selects(opt, group, name)
            and not any(isinstance(d, ParameterWiseLR) and d.selects(group, name) for d in opt._danlu_derivations)
        )
        if not ok:
            rest.append(i)
            continue
        rate = group["weight_decay_rate"] if wd is not None and wd.selects(group, name) else 0.0
        buckets.setdefault((p.device, p.dtype, rate, lrs[i]), []).append(i)
    for (device, _, rate, lr), members in buckets.items():
        ps = [params[i] for i in members]
        if group["bias_correction"]:
            step_values = [steps[i] for i in members]
        else:
            step_values = [math.inf] * len(members)
        step_t = list(torch.tensor(step_values, dtype=torch.float32, device=device).unbind())
        torch._fused_adamw_(
            ps,
            [grads[i] for i in members],
            [states[i]["exp_avg"] for i in members],
            [states[i]["exp_avg_sq"] for i in members],
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
        STATS["torch_fused_tensors"] += len(ps)
    return rest


def _group_signature(group: dict[str, Any]) -> tuple[Any, ...]:
    """The options of a group that decide a plan (everything but the lr, the counters and the tensors)."""
    skip = ("params", "param_names", "lr", APPLIED_STEPS, "calls")
    return tuple((k, repr(v)) for k, v in group.items() if k not in skip)


class _Plan:
    """Per-group kernel arguments that do not change from step to step: pointers, sizes, folded transforms."""

    def __init__(
        self,
        opt: Any,
        group: dict[str, Any],
        spec: Spec,
        key: Any,
        params: list[Tensor],
        states: list[dict[str, Any]],
        names: list[str | None],
    ) -> None:
        import numpy as np

        self.key = key
        slot_keys = spec.slots(group)
        derivations = opt._danlu_derivations
        has_accum = any(isinstance(d, GradientAccumulation) for d in derivations)
        self.after_index: list[int] = []
        self.ema = self.ema_first = self.lookahead = False
        seen_lookahead = False
        for index, d in enumerate(derivations):
            if isinstance(d, Lookahead):
                seen_lookahead = self.lookahead = True
                self.after_index.append(index)
            elif isinstance(d, ExponentialMovingAverage):
                self.after_index.append(index)
                self.ema, self.ema_first = True, not seen_lookahead
        self.rest: list[int] = []
        chosen: list[int] = []
        checks: list[tuple[dict[str, Any], str, Tensor]] = []
        ptr_rows: list[list[int]] = []
        folds: list[tuple[float, float, float, float]] = []
        adapted: list[bool] = []
        self.buffers: list[Tensor | None] = []
        shapes: list[list[int]] = []
        statics: list[list[float]] = []
        dtype = params[0].dtype if params else None
        for i, (p, state, name) in enumerate(zip(params, states, names)):
            ok = (
                type(p) in _PLAIN
                and p.device.type == "cpu"
                and p.dtype in _DTYPES
                and p.dtype == dtype
                and p.layout is torch.strided
                and p.is_contiguous()
                and not _lazy_selects(opt, group, name)
            )
            if spec.alg == -1:  # Adafactor: its statistics, and the momentum in the accumulation slot
                entry = _adafactor_slots(group, p, state, name) if ok and not _layer_adapted(opt, group, name) else None
                ok = entry is not None
                slot_keys_i, slots, shape, static = entry if entry is not None else ((), [], [], [])
            else:
                slot_keys_i = slot_keys
                slots = [state.get(k) if k is not None else None for k in slot_keys]
                ok = ok and all(k is None or _dense_like(t, p) for k, t in zip(slot_keys, slots))
            slow = state.get("lookahead.slow") if self.lookahead else None
            ok = ok and (not self.lookahead or _dense_like(slow, p))
            buffer = state.get("accum.grad") if has_accum else None
            if buffer is not None and not _dense_like(buffer, p):
                buffer = None
            if not ok:
                self.rest.append(i)
                continue
            shadow = None
            if self.ema:
                shadow = state.get("ema.shadow")
                if shadow is None:
                    shadow = state["ema.shadow"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if not _dense_like(shadow, p):
                    self.rest.append(i)
                    continue
            chosen.append(i)
            for k, t in zip(slot_keys_i, slots):
                if k is not None:
                    checks.append((state, k, t))
            for k, t in (("lookahead.slow", slow), ("ema.shadow", shadow)):
                if t is not None:
                    checks.append((state, k, t))
            if spec.alg == -1:
                shapes.append(shape)
                statics.append(static)
                buffer = slots[3]  # the momentum (or None) rides in the accumulation slot
                slots = slots[:3]
            self.buffers.append(buffer)
            ptr_rows.append([p.data_ptr(), 0, *[_ptr(t) for t in slots], _ptr(buffer), _ptr(slow), _ptr(shadow)])
            # fold the transforms at lr = 1: A and M do not depend on the lr, B and W are the lr times a constant
            a, b, post = _fold(opt, group, name, 1.0)
            m, w = _apply_post(1.0, 0.0, post)
            folds.append((a, b, m, w))
            adapted.append(_layer_adapted(opt, group, name))
        self.chosen = chosen
        self.params = [params[i] for i in chosen]
        self.param_ptrs = [r[0] for r in ptr_rows]
        self.checks = checks
        self.dtype = _DTYPES.get(dtype, 0) if dtype is not None else 0
        self.ids = {id(p) for p in self.params}
        n = len(chosen)
        self.ptrs = np.array(ptr_rows, dtype=np.int64).reshape(n, NSLOT)
        if spec.alg == -1:
            self.numel = np.array(shapes, dtype=np.int64).reshape(n, 2)
            self.statics = np.array(statics, dtype=np.float64).reshape(n, 10)
        else:
            self.numel = np.array([params[i].numel() for i in chosen], dtype=np.int64)
        self.folds = np.array(folds, dtype=np.float64).reshape(n, 4)
        self.adapted = np.array(adapted, dtype=bool)
        self.has_adapted = bool(self.adapted.any())
        self.all_adapted = bool(self.adapted.all())

    def valid(self, params: list[Tensor], states: list[dict[str, Any]]) -> bool:
        return [p.data_ptr() for p in self.params] == self.param_ptrs and all([st.get(k) is t for st, k, t in self.checks])

    def grads_ok(self, grads: list[Tensor]) -> bool:
        dtype = self.params[0].dtype if self.params else None
        return all(
            [
                type(g) in _PLAIN
                and g.layout is torch.strided
                and g.dtype is dtype
                and g.device.type == "cpu"
                and g.is_contiguous()
                for g in (grads[i] for i in self.chosen)
            ]
        )

    def run(
        self,
        opt: Any,
        ctx: StepContext,
        group: dict[str, Any],
        spec: Spec,
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lrs: list[float],
        steps: list[float],
    ) -> None:
        import numpy as np

        n = len(self.chosen)
        if n == 0:
            return
        lib = _native.load()
        chosen = self.chosen
        self.ptrs[:, 1] = [grads[i].data_ptr() for i in chosen]
        modes = np.zeros(n, dtype=np.int32)
        sync = self.lookahead and (group[APPLIED_STEPS] + 1) % group["steps_per_slow_update"] == 0
        base_mode = (M_SYNC if sync else 0) | (M_EMA if self.ema else 0) | (M_EMA_FIRST if self.ema and self.ema_first else 0)
        modes[:] = base_mode
        coef = np.zeros((n, NCOEF), dtype=np.float64)
        pending = ctx.pending_means
        touched_grads: list[Tensor] = []
        if pending:
            for row, i in enumerate(chosen):
                entry = pending.pop(id(params[i]), None)
                if entry is None:
                    continue
                buffer, k = entry
                if buffer is not self.buffers[row]:
                    self.ptrs[row, 5] = buffer.data_ptr()
                modes[row] |= M_ACCUM
                coef[row, 12] = k
                touched_grads.append(grads[i])
        lr_c = [lrs[i] for i in chosen]
        step_c = [steps[i] for i in chosen]
        uniform = len(set(zip(lr_c, step_c))) == 1
        if spec.alg == -1:  # static columns, then beta2 (from the step) and -lr
            coef[:, :10] = self.statics
            if group["beta2"] is None:
                beta2 = 1.0 - np.array(step_c) ** -0.8
            else:
                beta2 = np.full(n, float(group["beta2"]))
            coef[:, 0] = beta2
            coef[:, 1] = 1 - beta2
            coef[:, 8] = -np.array(lr_c)
            lr_col = lr_c[0] if uniform else np.array(lr_c)
        elif spec.alg == 5:  # NAdam: advance every mu_product in one call, then a row per tensor
            coef[:, :10] = _nadam_rows(group, [states[i] for i in chosen], lr_c, step_c, uniform)
            lr_col = lr_c[0] if uniform else np.array(lr_c)
        elif uniform:
            coef[:, :10] = _padded(spec.coefficients(opt, group, states[chosen[0]], lr_c[0], step_c[0]))
            lr_col = lr_c[0]
        else:
            cache: dict[tuple[float, float], list[float]] = {}
            for row, key in enumerate(zip(lr_c, step_c)):
                if key not in cache:
                    cache[key] = _padded(spec.coefficients(opt, group, states[chosen[row]], key[0], key[1]))
                coef[row, :10] = cache[key]
            lr_col = np.array(lr_c)
        coef[:, 10] = self.folds[:, 0]
        coef[:, 11] = lr_col * self.folds[:, 1]  # folded at lr = 1: B and W scale with the lr
        coef[:, 13] = group["slow_step_size"] if self.lookahead else 0.0
        coef[:, 14] = 1.0 - group["ema_momentum"] if self.ema else 0.0
        coef[:, 15] = self.folds[:, 2]
        coef[:, 16] = lr_col * self.folds[:, 3]
        coef[:, 17] = lr_col
        threads = torch.get_num_threads()
        if self.has_adapted and not self.all_adapted:
            for mask, phase in ((~self.adapted, PH_FULL), (self.adapted, PH_ADAPT)):
                self._launch(lib, spec, phase, threads, self.ptrs[mask], self.numel[mask], coef[mask], modes[mask])
        else:
            self._launch(lib, spec, PH_ADAPT if self.has_adapted else PH_FULL, threads, self.ptrs, self.numel, coef, modes)
        if _increment_version is not None:
            _increment_version(self.params + touched_grads)
        STATS["native_tensors"] += n
        for index in self.after_index:
            ctx.fused_after[(index, id(group))] = self.ids

    def _launch(self, lib: Any, spec: Spec, phase: int, threads: int, ptrs: Any, numel: Any, coef: Any, modes: Any) -> None:
        import numpy as np

        ptrs, numel, coef, modes = (np.ascontiguousarray(x) for x in (ptrs, numel, coef, modes))
        n = len(modes)
        if n == 0:
            return
        red = np.zeros(2 * n, dtype=np.float64)
        # raw addresses: numpy's ctypes.data_as keeps objects alive from call to call
        if spec.alg == -1:
            rc = lib.danlu_adafactor(self.dtype, n, _addr(numel), _addr(ptrs), _addr(coef), _addr(modes), threads)
        else:
            rc = lib.danlu_elementwise(
                self.dtype, spec.alg, n, _addr(numel), _addr(ptrs), _addr(coef), _addr(modes), phase, threads, _addr(red)
            )
        if rc != 0:  # pragma: no cover
            raise RuntimeError(f"danlu native kernel failed ({rc})")


def _addr(array: Any) -> int:
    return array.__array_interface__["data"][0]


def _nadam_rows(group: dict[str, Any], states: list[dict[str, Any]], lrs: list[float], steps: list[float], uniform: bool) -> Any:
    """NAdam's coefficients (``NAdam._coefficients``) for many tensors, ``mu_product`` advanced with one foreach call."""
    import numpy as np

    beta1, beta2 = group["betas"]
    psi = group["momentum_decay"]
    products = [s["mu_product"] for s in states]
    mus = [beta1 * (1.0 - 0.5 * 0.96 ** (t * psi)) for t in (steps[:1] if uniform else steps)]
    if uniform:
        torch._foreach_mul_(products, mus[0])
    else:
        torch._foreach_mul_(products, mus)
    values = torch.stack(products).tolist() if len(products) > 1 else [float(products[0])]
    rows = np.zeros((len(states), 10))
    for row, (lr, t, mu_product) in enumerate(zip(lrs, steps, values)):
        mu = mus[0] if uniform else mus[row]
        mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
        grad_coef = -lr * (1.0 - mu) / (1.0 - mu_product)
        momentum_coef = -lr * mu_next / (1.0 - mu_product * mu_next)
        rows[row, :7] = (1 - beta1, beta2, 1 - beta2, (1 - beta2**t) ** 0.5, group["eps"], grad_coef, momentum_coef)
    return rows


def _adafactor_slots(group: dict[str, Any], p: Tensor, state: dict[str, Any], name: str | None) -> tuple[Any, ...] | None:
    """(state keys, [axis-1 statistic, axis-0 statistic, v, momentum], [n0, n1], static coefficients) or None."""
    from danlu.optimizers.adafactor import factored_axes

    axes = factored_axes(tuple(p.shape), group["min_dim_size_to_factor"])
    if axes is None:
        v = state.get("exp_avg_sq")
        if not _dense_like(v, p):
            return None
        keys: list[str | None] = [None, None, "exp_avg_sq"]
        slots: list[Tensor | None] = [None, None, v]
        shape, row_is_a1 = [p.numel(), 0], 0.0
    else:
        if p.dim() != 2:
            return None
        largest = axes[0]
        row, col = state.get("exp_avg_sq_row"), state.get("exp_avg_sq_col")
        if not (_dense_like(row, p) and _dense_like(col, p)):
            return None
        keys = ["exp_avg_sq_row", "exp_avg_sq_col", None] if largest == 1 else ["exp_avg_sq_col", "exp_avg_sq_row", None]
        slots = [row, col, None] if largest == 1 else [col, row, None]
        shape, row_is_a1 = list(p.shape), float(largest == 1)
    m = None
    if group["beta1"] > 0:
        m = state.get("exp_avg")
        if not _dense_like(m, p):
            return None
    keys.append("exp_avg" if m is not None else None)
    slots.append(m)
    clip = group["clipping_threshold"]
    scaled = group["multiply_by_parameter_scale"] and not (
        group["exclude_from_parameter_scale"] and matches_any(tuple(group["exclude_from_parameter_scale"]), name or "")
    )
    static = [
        0.0,
        0.0,
        group["eps1"],
        group["eps2"],
        float(clip) if clip is not None else 0.0,
        group["beta1"],
        1 - group["beta1"],
        float(scaled),
        0.0,
        row_is_a1,
    ]
    return keys, slots, shape, static


def _padded(coef: list[float]) -> list[float]:
    return [*coef, *([0.0] * (10 - len(coef)))]


def _call(lib: Any, spec: Spec, dtype: int, batch: _Batch, phase: int, threads: int) -> tuple[Any, ...]:
    arrays = batch.arrays()
    numel, ptrs, coef, modes, red = arrays
    n = len(batch.modes)
    if spec.alg < 0:
        rc = lib.danlu_adafactor(dtype, n, numel, ptrs, coef, modes, threads)
    else:
        rc = lib.danlu_elementwise(dtype, spec.alg, n, numel, ptrs, coef, modes, phase, threads, red)
    if rc != 0:  # pragma: no cover - the Python side only sends what the library knows
        raise RuntimeError(f"danlu native kernel failed ({rc})")
    if phase != PH_NORM and _increment_version is not None and batch.tensors:
        _increment_version(batch.tensors)
    return arrays


def _adafactor_entry(
    opt: Any, group: dict[str, Any], p: Tensor, state: dict[str, Any], lr: float, step: float
) -> tuple[list[Tensor | None], list[float], list[int], Tensor | None] | None:
    from danlu.optimizers.adafactor import factored_axes

    axes = factored_axes(tuple(p.shape), group["min_dim_size_to_factor"])
    if axes is None:
        v = state.get("exp_avg_sq")
        if not _dense_like(v, p):
            return None
        a1 = a0 = None
        shape = [p.numel(), 0]
        row_is_a1 = 0.0
    else:
        if p.dim() != 2:
            return None
        largest, _ = axes
        row, col = state.get("exp_avg_sq_row"), state.get("exp_avg_sq_col")
        if not (_dense_like(row, p) and _dense_like(col, p)):
            return None
        a1, a0 = (row, col) if largest == 1 else (col, row)
        v = None
        shape = list(p.shape)
        row_is_a1 = float(largest == 1)
    m = state.get("exp_avg") if group["beta1"] > 0 else None
    if group["beta1"] > 0 and not _dense_like(m, p):
        return None
    beta2 = 1.0 - step**-0.8 if group["beta2"] is None else group["beta2"]
    clip = group["clipping_threshold"]
    coef = [
        beta2,
        1 - beta2,
        group["eps1"],
        group["eps2"],
        float(clip) if clip is not None else 0.0,
        group["beta1"],
        1 - group["beta1"],
        float(opt._parameter_scaled(group, p)),
        -lr,
        row_is_a1,
    ]
    return [p, p.grad, a1, a0, v], coef, shape, m
