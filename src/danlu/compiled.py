"""A ``torch.compile``-able step for derived Adam stacks: counters and hyperparameters as tensors.

``step = danlu.compiled.compile_step(opt)`` returns a callable that does what ``opt.step()`` does, as
one captured graph (``fullgraph=True``) over the optimizer's own tensors (parameters, gradients,
``state[p]`` entries, so ``state_dict()`` keeps working). Everything that changes during training
enters the graph as a tensor, never as a Python constant that dynamo would guard on:

* the step counters: ``state[p]["step"]`` (already tensors) and the group counters ``calls`` and
  ``applied_steps`` (handed in as 0-dim tensors on every call, built from the group's integers);
* the learning rate (``group["lr"]`` handed in as a tensor, so an LR scheduler does not recompile);
* the piecewise-linear multiplier, evaluated inside the graph from the applied-steps tensor;
* whether this call applies a step (gradient accumulation) and whether Lookahead syncs: both are
  computed in the graph and act through ``torch.where`` instead of Python ``if``.

So the step compiles once and runs 100 steps of a changing schedule without recompiling (see
tests/test_compile.py, which counts compilations). The price of branch-free code: a buffering call of
gradient accumulation computes (and discards) the whole update, so under accumulation this path moves
more bytes than the eager fast path; use it where a captured graph is worth that (CUDA graphs, or a
step fused with the rest of a compiled training step).

Supported: ``Adam`` (either ``bias_correction``) under any subset of weight decay, layer adaptation,
piecewise-linear lr, gradient accumulation, Lookahead, EMA and parameter-wise lr, in any order
(``AdamW``, ``Lamb`` and the issue's example, accumulation + Lookahead + AdamW with a piecewise lr).
Other bases and lazy optimization raise ``NotImplementedError``: their eager fast path is the native
kernels. Plain ``torch.compile(opt.step)`` is not the way: the derivation hooks read Python counters
and recompile as they change.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from danlu.derivations import (
    ExponentialMovingAverage,
    GradientAccumulation,
    LayerAdaptation,
    Lookahead,
    ParameterWiseLR,
    PiecewiseLinearLR,
    WeightDecay,
)
from danlu.derivations._base import APPLIED_STEPS, CALLS
from danlu.derivations.layer_adaptation import MIN_LR

__all__ = ["compile_step", "functional_step"]


def _piecewise(step: Tensor, schedule: dict[int, float]) -> Tensor:
    """danlu.schedules.piecewise_linear as tensor ops (the schedule's points are constants)."""
    points = sorted((int(k), float(v)) for k, v in schedule.items())
    if points[0][0] != 0:
        points.insert(0, (0, 0.0))
    value = torch.full_like(step, points[-1][1])
    for (begin, start), (end, stop) in reversed(list(itertools.pairwise(points))):
        slope = (stop - start) / (end - begin)
        value = torch.where(step < end, start + slope * (step - begin), value)
    return torch.where(step < points[0][0], torch.full_like(step, points[0][1]), value)


def functional_step(plan: dict[str, Any], tensors: dict[str, Any]) -> None:
    """One step of the stack described by ``plan`` over ``tensors`` (all updated in place, branch-free)."""
    calls, applied, base_lr = tensors["calls"], tensors["applied"], tensors["lr"]
    k = plan["accum"]
    apply = torch.remainder(calls + 1, k) == 0 if k > 1 else torch.ones((), dtype=torch.bool)
    multiplier = _piecewise(applied, plan["schedule"]) if plan["schedule"] is not None else torch.ones_like(applied)
    lr = base_lr * multiplier
    applied_new = applied + apply.to(applied.dtype)
    sync = None
    if plan["lookahead"] is not None:
        period, _ = plan["lookahead"]
        sync = apply & (torch.remainder(applied_new, period) == 0)
    beta1, beta2 = plan["betas"]
    for i, p in enumerate(tensors["params"]):
        g = tensors["grads"][i]
        if k > 1:
            buf = tensors["bufs"][i]
            summed = buf + g
            g_eff = summed / k
            buf.copy_(torch.where(apply, torch.zeros_like(buf), summed))
            g.copy_(torch.where(apply, g_eff, g))
        else:
            g_eff = g
        step_t = tensors["steps"][i]
        t = step_t + apply.to(step_t.dtype)
        step_t.copy_(t)
        t64 = t.to(torch.float64)
        m, v = tensors["exp_avgs"][i], tensors["exp_avg_sqs"][i]
        m_new = torch.lerp(m, g_eff, 1 - beta1)
        v_new = v * beta2 + (1 - beta2) * g_eff * g_eff
        if plan["bias_correction"]:
            correction1 = (1 - beta1**t64).to(p.dtype)
            sqrt_correction2 = torch.sqrt(1 - beta2**t64).to(p.dtype)
        else:
            correction1 = sqrt_correction2 = torch.ones((), dtype=p.dtype)
        lr_p = lr.to(p.dtype)
        d = m_new / (torch.sqrt(v_new) / sqrt_correction2 + plan["eps"]) * (-lr_p / correction1)
        for kind, value in plan["transforms"][i]:
            if kind == "wd":
                d = d + (-lr_p * value) * p
            elif kind == "mul":
                d = d * value
            else:  # layer adaptation
                param_norm = torch.linalg.vector_norm(p)
                update_norm = torch.linalg.vector_norm(d) / torch.clamp(lr_p, min=MIN_LR)
                ratio = torch.where((param_norm > 0) & (update_norm > 0), param_norm / update_norm, torch.ones_like(param_norm))
                d = d * ratio
        p_new = p + d
        ema_index = plan["ema_index"]
        ema = tensors["emas"][i] if ema_index is not None else None
        if ema is not None and plan["ema_first"]:
            ema.copy_(torch.where(apply, torch.lerp(ema, p_new, 1 - plan["ema_momentum"]), ema))
        if sync is not None:
            slow = tensors["slows"][i]
            synced = torch.lerp(slow, p_new, plan["lookahead"][1])
            slow.copy_(torch.where(sync, synced, slow))
            p_new = torch.where(sync, synced, p_new)
        if ema is not None and not plan["ema_first"]:
            ema.copy_(torch.where(apply, torch.lerp(ema, p_new, 1 - plan["ema_momentum"]), ema))
        m.copy_(torch.where(apply, m_new, m))
        v.copy_(torch.where(apply, v_new, v))
        p.copy_(torch.where(apply, p_new, p))


class CompiledStep:
    """The callable returned by :func:`compile_step`."""

    def __init__(self, opt: torch.optim.Optimizer, compile_kwargs: dict[str, Any]) -> None:
        from danlu.optimizers import Adam

        if not isinstance(opt, Adam) or type(opt)._update_single is not Adam._update_single:
            raise NotImplementedError(f"compile_step supports danlu.Adam stacks, not {type(opt).__name__}")
        known = (
            WeightDecay,
            LayerAdaptation,
            PiecewiseLinearLR,
            GradientAccumulation,
            Lookahead,
            ExponentialMovingAverage,
            ParameterWiseLR,
        )
        for d in opt._danlu_derivations:
            if not isinstance(d, known):
                raise NotImplementedError(f"compile_step does not support the {d.name} derivation")
        if len(opt.param_groups) != 1:
            raise NotImplementedError("compile_step supports one parameter group")
        self.opt = opt
        self.compiled: Callable[..., Any] = torch.compile(functional_step, **{"fullgraph": True, **compile_kwargs})

    def _plan_and_tensors(self) -> tuple[dict[str, Any], dict[str, Any]]:
        opt = self.opt
        group = opt.param_groups[0]
        derivations = opt._danlu_derivations
        names = opt._names(group)
        params = [p for p in group["params"] if p.grad is not None]
        pnames = [n for p, n in zip(group["params"], names) if p.grad is not None]
        plan: dict[str, Any] = {
            "betas": tuple(group["betas"]),
            "eps": group["eps"],
            "bias_correction": group["bias_correction"],
            "accum": group.get("grad_accum_steps", 1) if any(isinstance(d, GradientAccumulation) for d in derivations) else 1,
            "schedule": None,
            "lookahead": None,
            "ema_index": None,
            "ema_first": True,
            "ema_momentum": group.get("ema_momentum", 0.0),
            "transforms": [],
        }
        seen_lookahead = False
        for index, d in enumerate(derivations):
            if isinstance(d, PiecewiseLinearLR):
                plan["schedule"] = dict(group["lr_schedule"])
            elif isinstance(d, Lookahead):
                plan["lookahead"] = (group["steps_per_slow_update"], group["slow_step_size"])
                seen_lookahead = True
            elif isinstance(d, ExponentialMovingAverage):
                plan["ema_index"] = index
                plan["ema_first"] = not seen_lookahead
        for name in pnames:
            ops: list[tuple[str, float]] = []
            for d in derivations:
                if not d.has_transform or not d.selects(group, name):
                    continue
                if isinstance(d, WeightDecay):
                    ops.append(("wd", group["weight_decay_rate"]))
                elif isinstance(d, ParameterWiseLR):
                    ops.append(("mul", float(d.multiplier(group, name))))  # type: ignore[arg-type]
                else:
                    ops.append(("layer", 0.0))
            plan["transforms"].append(tuple(ops))
        plan["transforms"] = tuple(plan["transforms"])
        states = []
        for p in params:
            state = opt.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                opt._init_state(p, state, group)
            if plan["lookahead"] is not None and "lookahead.slow" not in state:
                state["lookahead.slow"] = p.detach().clone(memory_format=torch.preserve_format)
            if plan["ema_index"] is not None and "ema.shadow" not in state:
                state["ema.shadow"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if plan["accum"] > 1 and "accum.grad" not in state:
                state["accum.grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states.append(state)
        dtype = torch.float64
        tensors = {
            "params": params,
            "grads": [p.grad for p in params],
            "exp_avgs": [s["exp_avg"] for s in states],
            "exp_avg_sqs": [s["exp_avg_sq"] for s in states],
            "steps": [s["step"] for s in states],
            "slows": [s["lookahead.slow"] for s in states] if plan["lookahead"] is not None else [],
            "emas": [s["ema.shadow"] for s in states] if plan["ema_index"] is not None else [],
            "bufs": [s["accum.grad"] for s in states] if plan["accum"] > 1 else [],
            "calls": torch.tensor(float(group[CALLS]), dtype=dtype),
            "applied": torch.tensor(float(group[APPLIED_STEPS]), dtype=dtype),
            "lr": torch.tensor(float(group["lr"]), dtype=dtype),
        }
        return plan, tensors

    @torch.no_grad()
    def __call__(self) -> None:
        opt = self.opt
        plan, tensors = self._plan_and_tensors()
        self.compiled(plan, tensors)
        group = opt.param_groups[0]
        applies = (group[CALLS] + 1) % plan["accum"] == 0
        group[CALLS] += 1
        if applies:
            group[APPLIED_STEPS] += 1


def compile_step(opt: torch.optim.Optimizer, **compile_kwargs: Any) -> CompiledStep:
    """A compiled, ``fullgraph=True`` equivalent of ``opt.step()`` for danlu Adam stacks (see the module doc).

    ``compile_kwargs`` go to ``torch.compile`` (``backend``, ``mode``, ``dynamic``...).

    Example:
        >>> import torch, danlu
        >>> from danlu.compiled import compile_step
        >>> Stack = danlu.extend_with_lookahead(danlu.extend_with_gradient_accumulation(
        ...     danlu.extend_with_piecewise_linear_lr(danlu.AdamW)))
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> opt = Stack([w], lr=1e-3, lr_schedule={10: 1.0}, grad_accum_steps=2)
        >>> step = compile_step(opt, backend="eager")
        >>> w.grad = torch.ones(3); step()
    """
    return CompiledStep(opt, compile_kwargs)
