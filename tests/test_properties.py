"""Property-based tests (hypothesis): laws that hold for every optimizer, stack, shape and input."""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import danlu
from cases import DERIVATION_CASES, FOREIGN_CASES, OPTIMIZER_CASES
from danlu._host import DerivationHost
from danlu.schedules import piecewise_linear

# 30 examples a test in CI (a few seconds); DANLU_HYPOTHESIS_EXAMPLES=500 for a deep run
SETTINGS = settings(
    max_examples=int(os.environ.get("DANLU_HYPOTHESIS_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

ROWS = {case.spec: case for case in OPTIMIZER_CASES + FOREIGN_CASES if case.spec}
"""One row per create_optimizer base name (and a few torch.optim bases), from the tables."""
BASES: dict[str, dict[str, Any]] = {spec: dict(case.kwargs) for spec, case in ROWS.items()}
# the drawn models name their tensors p0, p1, ...: the name-matching options match those
NAMED_OPTIONS: dict[str, dict[str, Any]] = {
    "lazy": dict(include_in_lazy_optimization=["p0"]),
    "paramwise_lr": dict(paramwise_lr_schedule={"p1": 0.5}),
    "piecewise_linear_lr": dict(lr_schedule={0: 0.3, 3: 1.0}),
}
DERIVATIONS: dict[str, dict[str, Any]] = {case.id: {**case.kwargs, **NAMED_OPTIONS.get(case.id, {})} for case in DERIVATION_CASES}
# the ready-made optimizers already hold some derivations
HELD = {spec: set(case.holds) for spec, case in ROWS.items()}

shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple), min_size=2, max_size=4
)


REFUSED_ORDERS = {("schedule_free", "lookahead")}
"""(inner, outer) derivations that a stack refuses with a ValueError (Lookahead over Schedule-Free acts on y)."""


def _allowed(chosen: list[str]) -> bool:
    return not any((a, b) in REFUSED_ORDERS for i, a in enumerate(chosen) for b in chosen[i + 1 :])


@st.composite
def stacks(draw: Any, bases: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    base = draw(st.sampled_from(bases or list(BASES)))
    names = [n for n in DERIVATIONS if n not in HELD.get(base, set())]
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=4).filter(_allowed))
    kwargs = dict(BASES[base])
    for name in chosen:
        kwargs.update(DERIVATIONS[name])
    return "+".join([base, *chosen]), kwargs


def named(shape_list: list[tuple[int, ...]], seed: int, dtype: torch.dtype = torch.float64) -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    return [(f"p{i}", torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype))) for i, s in enumerate(shape_list)]


def gradients(pairs: list[tuple[str, torch.Tensor]], seed: int, zero_rows: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _, p in pairs:
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if zero_rows and grad.dim() > 1:
            grad[0] = 0  # a row without gradient (lazy updates)
        out.append(grad)
    return out


def build(pairs: list[tuple[str, torch.Tensor]], spec: str, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # patterns that match no name in a drawn model
        return danlu.create_optimizer(pairs, spec, **copy.deepcopy(kwargs))


def step_with(opt: torch.optim.Optimizer, pairs: list[tuple[str, torch.Tensor]], grads: list[torch.Tensor]) -> None:
    for (_, p), g in zip(pairs, grads):
        p.grad = g.clone()
    opt.step()


def state_snapshot(opt: torch.optim.Optimizer) -> Any:
    return copy.deepcopy(opt.state_dict())


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ------------------------------------------------------------------------------ lr = 0
@SETTINGS
@given(stack=stacks(), shape_list=shapes, seed=st.integers(0, 2**16), calls=st.integers(1, 5))
def test_lr_zero_leaves_parameters_unchanged(stack: tuple[str, dict[str, Any]], shape_list: Any, seed: int, calls: int) -> None:
    spec, kwargs = stack
    kwargs = {**kwargs, "lr": 0.0}
    pairs = named(shape_list, seed)
    before = [p.detach().clone() for _, p in pairs]
    opt = build(pairs, spec, kwargs)
    for call in range(calls):
        step_with(opt, pairs, gradients(pairs, seed + call))
    assert all(torch.equal(p, b) for (_, p), b in zip(pairs, before))


# ------------------------------------------------------------------------------ zero gradients
@SETTINGS
@given(
    shape_list=shapes,
    seed=st.integers(0, 2**16),
    lr=st.floats(1e-4, 0.5),
    rate=st.floats(0.0, 1.0),
    calls=st.integers(1, 6),
    warmup=st.booleans(),
)
def test_zero_gradients_under_adamw_only_decay(
    shape_list: Any, seed: int, lr: float, rate: float, calls: int, warmup: bool
) -> None:
    pairs = named(shape_list, seed)
    expected = [p.detach().clone() for _, p in pairs]
    schedule = {0: 0.2, 4: 1.0}
    spec = "adamw+piecewise_linear_lr" if warmup else "adamw"
    extra = dict(lr_schedule=schedule) if warmup else {}
    opt = build(pairs, spec, dict(lr=lr, weight_decay_rate=rate, exclude_from_weight_decay=(), **extra))
    for call in range(calls):
        step_with(opt, pairs, [torch.zeros_like(p) for _, p in pairs])
        lr_t = lr * (piecewise_linear(call, schedule) if warmup else 1.0)
        expected = [e - lr_t * rate * e for e in expected]
    for (_, p), e in zip(pairs, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------------------ EMA
@SETTINGS
@given(
    stack=stacks(["sgd", "adam", "lion", "torch.SGD"]),
    shape_list=shapes,
    seed=st.integers(0, 2**16),
    momentum=st.floats(0.0, 0.99),
    calls=st.integers(1, 8),
    bias_correction=st.booleans(),
)
def test_ema_is_the_bias_corrected_weighted_mean(
    stack: tuple[str, dict[str, Any]], shape_list: Any, seed: int, momentum: float, calls: int, bias_correction: bool
) -> None:
    spec, kwargs = stack
    spec = "+".join(part for part in spec.split("+") if part != "ema") + "+ema"  # EMA sees the final weights
    kwargs = {**kwargs, "ema_momentum": momentum}
    pairs = named(shape_list, seed)
    opt = build(pairs, spec, kwargs)
    history: list[list[torch.Tensor]] = []
    for call in range(calls):
        step_with(opt, pairs, gradients(pairs, seed + call, zero_rows=False))
        if opt.param_groups[0]["calls"] > len(history) and opt.param_groups[0]["applied_steps"] > len(history):
            history.append([p.detach().clone() for _, p in pairs])
    assume(history)
    t = len(history)
    assert opt.param_groups[0]["applied_steps"] == t
    weights = [(1 - momentum) * momentum ** (t - i) for i in range(1, t + 1)]
    scale = 1 - momentum**t if bias_correction else 1.0
    expected = [sum(w * h[j] for w, h in zip(weights, history)) / scale for j in range(len(pairs))]
    with opt.ema_weights(bias_correction=bias_correction):
        for (_, p), e in zip(pairs, expected):
            torch.testing.assert_close(p.detach(), e, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ accumulation
@SETTINGS
@given(
    base=st.sampled_from(list(BASES)),
    shape_list=shapes,
    seed=st.integers(0, 2**16),
    k=st.integers(1, 5),
    warm=st.integers(0, 2),
)
def test_k_accumulation_calls_equal_one_step_with_the_mean(base: str, shape_list: Any, seed: int, k: int, warm: int) -> None:
    kwargs = dict(BASES[base])
    plain_pairs, accum_pairs = named(shape_list, seed), named(shape_list, seed)
    plain = build(plain_pairs, base, kwargs)
    accum = build(accum_pairs, base + "+gradient_accumulation", {**kwargs, "grad_accum_steps": k})
    for cycle in range(warm + 1):
        grads = [gradients(plain_pairs, seed + 10 * cycle + i) for i in range(k)]
        mean = [sum(g[j] for g in grads) / k for j in range(len(plain_pairs))]
        step_with(plain, plain_pairs, mean)
        inner_before = dict(state_snapshot(accum)["state"].items())
        for i, g in enumerate(grads):
            step_with(accum, accum_pairs, g)
            if i < k - 1:  # buffering: nothing but the buffer changes
                now = state_snapshot(accum)["state"]
                for key, entry in inner_before.items():
                    assert same({n: v for n, v in entry.items() if n != "accum.grad"}, {n: v for n, v in now[key].items() if n != "accum.grad"})
        for (_, p), (_, q) in zip(plain_pairs, accum_pairs):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-10, atol=1e-12)
    assert accum.param_groups[0]["applied_steps"] == warm + 1
    assert accum.param_groups[0]["calls"] == (warm + 1) * k


# ------------------------------------------------------------------------------ schedule
def reference_schedule(step: float, schedule: dict[int, float]) -> float:
    points = sorted(schedule.items())
    if points[0][0] != 0:
        points.insert(0, (0, 0.0))
    if step >= points[-1][0]:
        return points[-1][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= step < x1:
            return y0 + (y1 - y0) * (step - x0) / (x1 - x0)
    raise AssertionError("unreachable")


schedules = st.dictionaries(st.integers(0, 1000), st.floats(0, 10, allow_nan=False), min_size=1, max_size=6)


@SETTINGS
@given(schedule=schedules, step=st.integers(0, 1200))
def test_piecewise_schedule_values(schedule: dict[int, float], step: int) -> None:
    assert piecewise_linear(step, schedule) == pytest.approx(reference_schedule(step, schedule), rel=1e-12, abs=1e-12)
    keys = sorted(schedule)
    for key in keys:  # the value at a key is the key's value
        if key != 0 or 0 in schedule:
            assert piecewise_linear(key, schedule) == pytest.approx(schedule[key], rel=1e-12, abs=1e-12)


@SETTINGS
@given(
    schedule=st.dictionaries(st.integers(0, 11), st.floats(0, 10, allow_nan=False), min_size=1, max_size=4),
    calls=st.integers(1, 14),
    lr=st.floats(0.01, 1.0),
)
def test_the_schedule_multiplies_the_lr_of_each_applied_step(schedule: dict[int, float], calls: int, lr: float) -> None:
    w = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = danlu.extend_with_piecewise_linear_lr(danlu.SGD)([w], lr=lr, lr_schedule=schedule)
    for call in range(calls):
        before = w.item()
        w.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
        assert before - w.item() == pytest.approx(lr * reference_schedule(call, schedule), rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------------ parameter order
@SETTINGS
@given(stack=stacks(), shape_list=shapes, seed=st.integers(0, 2**16), order_seed=st.integers(0, 2**16), calls=st.integers(1, 5))
def test_the_order_of_parameters_does_not_matter(
    stack: tuple[str, dict[str, Any]], shape_list: Any, seed: int, order_seed: int, calls: int
) -> None:
    spec, kwargs = stack
    pairs = named(shape_list, seed)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(order_seed)).tolist()
    permuted = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in (pairs[i] for i in order)]
    opt, opt_permuted = build(pairs, spec, kwargs), build(permuted, spec, kwargs)
    for call in range(calls):
        grads = gradients(pairs, seed + call)
        step_with(opt, pairs, grads)
        step_with(opt_permuted, permuted, [grads[i] for i in order])
    by_name = dict(permuted)
    for name, p in pairs:
        assert torch.equal(p, by_name[name]), name
        assert same(dict(opt.state[p]), dict(opt_permuted.state[by_name[name]]))


# ------------------------------------------------------------------------------ failed steps
FAILURES = ["closure", "sparse_gradient", "nan_lr", "negative_lr", "ema_applied", "skip_limit"]


@SETTINGS
@given(
    stack=stacks(),
    shape_list=shapes,
    seed=st.integers(0, 2**16),
    calls=st.integers(0, 4),
    failure=st.sampled_from(FAILURES),
    where=st.integers(0, 3),
)
def test_a_failed_step_leaves_parameters_lr_and_state_as_they_were(
    stack: tuple[str, dict[str, Any]], shape_list: Any, seed: int, calls: int, failure: str, where: int
) -> None:
    spec, kwargs = stack
    if failure == "sparse_gradient":
        row = ROWS[spec.split("+")[0]]
        assume(not row.supports_sparse and not row.foreign)  # those take sparse gradients, or are not danlu's
    if failure == "ema_applied":
        assume("+ema" in spec)
        calls = max(calls, 2)
    if failure == "skip_limit":
        assume("skip_nonfinite" in spec)
        kwargs = {**kwargs, "max_consecutive_skips": 1}
    pairs = named(shape_list, seed)
    opt = build(pairs, spec, kwargs)
    for call in range(calls):
        step_with(opt, pairs, gradients(pairs, seed + call))
    if failure == "ema_applied" and opt.param_groups[0]["applied_steps"] == 0:
        step_with(opt, pairs, gradients(pairs, seed + 99))
    grads = gradients(pairs, seed + 100)
    for (_, p), g in zip(pairs, grads):
        p.grad = g
    closure = None
    if failure == "closure":

        def closure() -> None:
            raise KeyError("the loss could not be computed")

    elif failure == "sparse_gradient":
        index = where % len(pairs)
        p = pairs[index][1]
        assume(p.dim() >= 1)
        p.grad = torch.zeros_like(p).to_sparse()
    elif failure in ("nan_lr", "negative_lr"):
        assume(isinstance(opt, DerivationHost))  # a bare torch.optim class is torch's, not danlu's
        opt.param_groups[-1]["lr"] = math.nan if failure == "nan_lr" else -0.1
    elif failure == "ema_applied":
        opt.apply_ema_weights()
    elif failure == "skip_limit":
        pairs[where % len(pairs)][1].grad = torch.full_like(pairs[where % len(pairs)][1], math.nan)
        opt.step()  # the one skip that is allowed
    before_params = [p.detach().clone() for _, p in pairs]
    before_state = state_snapshot(opt)
    before_lrs = [g["lr"] for g in opt.param_groups]
    with pytest.raises((KeyError, ValueError, TypeError, RuntimeError, FloatingPointError)):
        opt.step(closure)
    assert all(torch.equal(p, b) for (_, p), b in zip(pairs, before_params))
    after_lrs = [g["lr"] for g in opt.param_groups]
    assert [repr(x) for x in after_lrs] == [repr(x) for x in before_lrs]
    assert same(before_state, state_snapshot(opt)) or (failure == "nan_lr" and same_but_nan(before_state, state_snapshot(opt)))


def same_but_nan(a: Any, b: Any) -> bool:
    """``same`` where nan equals nan (a state dict holding the nan lr)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same_but_nan(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_but_nan(x, y) for x, y in zip(a, b))
    return same(a, b)
