"""A plain simulator of the contract's derivation formulas (API.md section 2), the oracle for derived optimizers.

It works tensor by tensor on dicts of float64 tensors and knows nothing of danlu's internals: each
derivation is written as the contract states it, applied in nesting order (innermost first).
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import Tensor


class AdamMath:
    """bert4keras Adam: p - lr * m_hat / (sqrt(v_hat) + eps)."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m: dict[str, Tensor] = {}
        self.v: dict[str, Tensor] = {}
        self.t: dict[str, int] = {}

    def step(self, name: str, p: Tensor, g: Tensor, lr: float) -> Tensor:
        b1, b2 = self.betas
        self.t[name] = t = self.t.get(name, 0) + 1
        self.m[name] = m = b1 * self.m.get(name, torch.zeros_like(p)) + (1 - b1) * g
        self.v[name] = v = b2 * self.v.get(name, torch.zeros_like(p)) + (1 - b2) * g * g
        return p - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)


class SignMomentumMath:
    """The third-party optimizer of the tests: m = mu * m + g; p - lr * sign(m)."""

    def __init__(self, lr: float, mu: float = 0.5) -> None:
        self.lr, self.mu = lr, mu
        self.m: dict[str, Tensor] = {}

    def step(self, name: str, p: Tensor, g: Tensor, lr: float) -> Tensor:
        self.m[name] = m = self.mu * self.m.get(name, torch.zeros_like(p)) + g
        return p - lr * torch.sign(m)


class SignMomentum(torch.optim.Optimizer):
    """A 'third-party' optimizer: not danlu's, not torch.optim's; initializes state when it is empty."""

    def __init__(self, params: Any, lr: float = 0.01, mu: float = 0.5) -> None:
        super().__init__(params, dict(lr=lr, mu=mu))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["momentum"] = torch.zeros_like(p)
                state["momentum"].mul_(group["mu"]).add_(p.grad)
                p.add_(torch.sign(state["momentum"]), alpha=-group["lr"])
        return None


def piecewise(t: int, schedule: dict[int, float]) -> float:
    points = sorted(schedule.items())
    if points[0][0] != 0:
        points = [(0, 0.0)] + points
    if t >= points[-1][0]:
        return points[-1][1]
    for (a, va), (b, vb) in zip(points, points[1:]):
        if a <= t < b:
            return va + (vb - va) * (t - a) / (b - a)
    raise AssertionError


def simulate(
    base: Any,
    derivations: list[tuple[str, dict[str, Any]]],
    params: dict[str, Tensor],
    grads: list[dict[str, Tensor]],
) -> tuple[list[dict[str, Tensor]], dict[str, Tensor] | None, int]:
    """Return (parameters after every call, EMA shadow at the end, applied steps)."""
    options = {k: v for _, kw in derivations for k, v in kw.items()}
    names = [d for d, _ in derivations]
    params = {n: p.clone() for n, p in params.items()}
    applied = calls = 0
    buffers = {n: torch.zeros_like(p) for n, p in params.items()}
    slow = {n: p.clone() for n, p in params.items()}
    ema = {n: torch.zeros_like(p) for n, p in params.items()}
    schedule_free = "schedule_free" in names  # the base steps z; x averages z; the parameters hold y
    z = {n: p.clone() for n, p in params.items()}
    x = {n: p.clone() for n, p in params.items()}
    lr_max = weight_sum = 0.0
    history = []
    for step_grads in grads:
        calls += 1
        g = dict(step_grads)
        if "gradient_accumulation" in names:
            k = options["grad_accum_steps"]
            for n in g:
                buffers[n] = buffers[n] + g[n]
            if calls % k:
                history.append({n: p.clone() for n, p in params.items()})
                continue
            g = {n: buffers[n] / k for n in g}
            buffers = {n: torch.zeros_like(p) for n, p in params.items()}
        if "clip" in names:
            g = _clip(options, g)
        lr_t = base.lr * (piecewise(applied, options["lr_schedule"]) if "piecewise_linear_lr" in names else 1.0)
        for n, p_old in (z if schedule_free else params).items():
            d = base.step(n, p_old, g[n], lr_t) - p_old
            for name in names:
                d = _transform(name, options, n, p_old, d, g[n], lr_t)
            (z if schedule_free else params)[n] = p_old + d
        applied += 1
        if schedule_free:
            lr_max = max(lr_max, lr_t)
            weight = applied ** options["average_power"] * lr_max ** options.get("weight_lr_power", 2.0)
            weight_sum += weight
            for n in params:
                x[n] = x[n] + weight / weight_sum * (z[n] - x[n])
                params[n] = x[n] + (1 - options["schedule_free_momentum"]) * (z[n] - x[n])
        for name in names:
            if name == "lookahead" and applied % options["steps_per_slow_update"] == 0:
                for n in params:
                    slow[n] = slow[n] + options["slow_step_size"] * (params[n] - slow[n])
                    params[n] = slow[n].clone()
            if name == "ema":
                m = options["ema_momentum"]
                for n in params:
                    ema[n] = m * ema[n] + (1 - m) * params[n]
        history.append({n: p.clone() for n, p in params.items()})
    return history, (ema if "ema" in names else None), applied


def _clip(o: dict[str, Any], g: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keras' clipping of the gradient the applied step uses (after accumulation's mean)."""
    if o.get("global_clipnorm") is not None:
        c = o["global_clipnorm"]
        norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g.values()))
        return {n: t * (c / max(norm, c)) for n, t in g.items()}
    if o.get("clipnorm") is not None:
        c = o["clipnorm"]
        return {n: t * (c / max(float(t.norm()), c)) for n, t in g.items()}
    c = o["clipvalue"]
    return {n: t.clamp(-c, c) for n, t in g.items()}


def _search(patterns: Any, name: str) -> bool:
    return any(re.search(p, name) for p in patterns)


def _transform(kind: str, o: dict[str, Any], name: str, p: Tensor, d: Tensor, g: Tensor, lr: float) -> Tensor:
    if kind == "weight_decay" and not _search(o.get("exclude_from_weight_decay", ()), name):
        return d - lr * o["weight_decay_rate"] * p
    if kind == "layer_adaptation" and not _search(o.get("exclude_from_layer_adaptation", ()), name):
        p_norm = p.norm()
        d_norm = (d / max(lr, 1e-7)).norm()
        ratio = p_norm / d_norm if p_norm > 0 and d_norm > 0 else 1.0
        return d * ratio
    if kind == "lazy" and _search(o.get("include_in_lazy_optimization", ()), name):
        mask = g.ne(0) if g.dim() == 0 else g.ne(0).any(dim=-1, keepdim=True)
        return d * mask
    if kind == "paramwise_lr":
        factors = [v for k, v in o["paramwise_lr_schedule"].items() if k in name]
        return d * math.prod(factors) if factors else d
    return d
