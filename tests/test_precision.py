"""16-bit parameters: float32 state, the ``state_dtype`` option, stochastic rounding, dtype-keeping loads."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

import danlu
from cases import OptimizerCase, base_cases, case_ids, one_per_class
from danlu._precision import stochastic_round_bf16

DERIVED = "+gradient_accumulation+lookahead+ema"
STACKABLE = [case for case in one_per_class(base_cases()) if not set(case.holds) & {"gradient_accumulation", "lookahead", "ema"}]
CLASSES = one_per_class()
BASE_CLASSES = one_per_class(base_cases())  # the rounded-once law is the base update's; derived classes add their own writes


def params(dtype: torch.dtype, seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (6, 5), "b": (5,), "k": (3, 4, 2)}
    return [(n, torch.nn.Parameter(torch.randn(s, generator=g).to(dtype))) for n, s in shapes.items()]


def grads(pairs: list[tuple[str, torch.Tensor]], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for _, p in pairs]


def run(opt: torch.optim.Optimizer, pairs: list[tuple[str, torch.Tensor]], calls: range) -> None:
    for call in calls:
        for (_, p), g in zip(pairs, grads(pairs, call)):
            p.grad = g
        opt.step()


def float_state_dtypes(opt: torch.optim.Optimizer) -> set[torch.dtype]:
    return {v.dtype for s in opt.state.values() for k, v in s.items() if isinstance(v, torch.Tensor) and v.dim() > 0}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", STACKABLE, ids=case_ids(STACKABLE))
def test_16_bit_parameters_have_float32_state(case: OptimizerCase, dtype: torch.dtype) -> None:
    pairs = params(dtype)
    derived = danlu.extend_with_exponential_moving_average(
        danlu.extend_with_lookahead(danlu.extend_with_gradient_accumulation(case.cls))
    )
    opt = derived(pairs, **case.kwargs, steps_per_slow_update=2)
    run(opt, pairs, range(6))
    assert float_state_dtypes(opt) == {torch.float32}
    assert all(p.dtype == dtype and torch.isfinite(p).all() for _, p in pairs)


@pytest.mark.parametrize("case", BASE_CLASSES, ids=case_ids(BASE_CLASSES))
def test_bf16_step_is_the_float32_step_rounded_once(case: OptimizerCase) -> None:
    """bf16 parameters with float32 state = float32 parameters rounded to bf16 after every step."""
    low = params(torch.bfloat16)
    high = [(n, torch.nn.Parameter(p.detach().float())) for n, p in low]
    opt_low, opt_high = case.build(low), case.build(high)
    for call in range(5):
        for (_, p), (_, q), g in zip(low, high, grads(low, call)):
            p.grad, q.grad = g, g.float()
        opt_low.step()
        opt_high.step()
        with torch.no_grad():
            for _, q in high:
                q.copy_(q.to(torch.bfloat16).float())
        for (_, p), (_, q) in zip(low, high):
            assert torch.equal(p.float(), q), f"call {call}"


def test_state_dtype_option() -> None:
    pairs = params(torch.float32)
    opt = danlu.AdamW(pairs, lr=0.01, state_dtype=torch.float64)
    run(opt, pairs, range(3))
    assert float_state_dtypes(opt) == {torch.float64}
    assert all(p.dtype == torch.float32 for _, p in pairs)
    low = params(torch.bfloat16)
    opt = danlu.Adam(low, lr=0.01, state_dtype=torch.bfloat16)  # explicitly narrow: as torch.optim does
    run(opt, low, range(3))
    assert float_state_dtypes(opt) == {torch.bfloat16}
    narrow = params(torch.float32)
    opt = danlu.create_optimizer(narrow, "adam" + DERIVED, lr=0.01, state_dtype=torch.bfloat16)
    run(opt, narrow, range(4))
    state = opt.state[narrow[0][1]]
    assert state["exp_avg"].dtype == torch.bfloat16
    # the derivations' parameter-shaped state is never narrower than the parameter
    assert state["lookahead.slow"].dtype == state["ema.shadow"].dtype == state["accum.grad"].dtype == torch.float32


def test_state_dtype_per_group() -> None:
    a, b = params(torch.bfloat16)[:2]
    opt = danlu.Adam([{"params": [a[1]]}, {"params": [b[1]], "state_dtype": torch.float64}], lr=0.01)
    run(opt, [a, b], range(2))
    assert opt.state[a[1]]["exp_avg"].dtype == torch.float32
    assert opt.state[b[1]]["exp_avg"].dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(state_dtype="float32"), TypeError, "state_dtype"),
        (dict(state_dtype=torch.int32), ValueError, "state_dtype"),
        (dict(state_dtype=torch.complex64), ValueError, "state_dtype"),
        (dict(stochastic_rounding=1), TypeError, "stochastic_rounding"),
        (dict(stochastic_rounding=None), TypeError, "stochastic_rounding"),
    ],
)
@pytest.mark.parametrize("case", CLASSES, ids=case_ids(CLASSES))
def test_bad_precision_options(case: OptimizerCase, kwargs: dict[str, Any], error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        case.build(params(torch.float32), **kwargs)


# ------------------------------------------------------------------------------ stochastic rounding
def test_stochastic_rounding_is_unbiased() -> None:
    x = torch.rand(200_000) * 8 - 4
    rounded = stochastic_round_bf16(x, seed=7).float()
    lower = x.to(torch.bfloat16).float()
    assert ((rounded - x).abs() < 2 * (lower - x).abs().max() + 1e-2).all()
    assert abs(float((rounded - x).mean())) < 2e-4  # nearest rounding is unbiased too, but per element:
    y = torch.full((100_000,), 1.0 + 2.0**-9)  # a quarter of a bf16 ulp above 1
    r = stochastic_round_bf16(y, seed=3).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert float(r.mean()) == pytest.approx(1.0 + 2.0**-9, abs=5e-5)  # 4 standard deviations
    special = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0])
    assert torch.equal(stochastic_round_bf16(special, 1), special.to(torch.bfloat16))
    assert stochastic_round_bf16(torch.tensor([float("nan")]), 1).isnan().all()


def test_stochastic_rounding_keeps_updates_smaller_than_half_an_ulp() -> None:
    """SGD steps of 1e-3 on bf16 weights of 1 (ulp 2**-7): nearest rounding never moves them."""
    results = {}
    for sr in (False, True):
        w = torch.nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))
        opt = danlu.SGD([w], lr=1e-3, stochastic_rounding=sr)
        for _ in range(100):
            w.grad = torch.ones_like(w)
            opt.step()
        results[sr] = float(w.detach().float().mean())
    assert results[False] == 1.0
    assert results[True] == pytest.approx(0.9, abs=2e-3)


def test_stochastic_rounding_resumes_bit_identically() -> None:
    spec = "adamw" + DERIVED
    pairs = params(torch.bfloat16)
    opt = danlu.create_optimizer(pairs, spec, lr=0.01, stochastic_rounding=True, steps_per_slow_update=2)
    run(opt, pairs, range(10))
    resumed = params(torch.bfloat16)
    first = danlu.create_optimizer(resumed, spec, lr=0.01, stochastic_rounding=True, steps_per_slow_update=2)
    run(first, resumed, range(5))
    buffer = io.BytesIO()
    torch.save({"opt": first.state_dict(), "params": [p.detach() for _, p in resumed]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    fresh = params(torch.bfloat16, seed=1)
    with torch.no_grad():
        for (_, p), value in zip(fresh, saved["params"]):
            p.copy_(value)
    second = danlu.create_optimizer(fresh, spec, lr=0.01, stochastic_rounding=True, steps_per_slow_update=2)
    second.load_state_dict(saved["opt"])
    run(second, fresh, range(5, 10))
    for (_, p), (_, q) in zip(pairs, fresh):
        assert torch.equal(p, q)


def test_stochastic_rounding_leaves_wider_parameters_alone() -> None:
    a, b = params(torch.float32), params(torch.float32)
    # foreach=True on both: the same (generic) kernels, so that the comparison can be bitwise
    run(danlu.Adam(a, lr=0.01, stochastic_rounding=True, foreach=True), a, range(4))
    run(danlu.Adam(b, lr=0.01, foreach=True), b, range(4))
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(a, b))


# ------------------------------------------------------------------------------ load keeps dtypes
@pytest.mark.parametrize(
    "spec,dtype,kwargs",
    [
        ("adam" + DERIVED, torch.bfloat16, {}),
        ("nadam+ema", torch.float16, {}),
        ("adafactor+lookahead", torch.bfloat16, dict(min_dim_size_to_factor=2)),
        ("adamw", torch.float32, dict(state_dtype=torch.float64)),
    ],
)
def test_load_state_dict_keeps_state_dtypes(spec: str, dtype: torch.dtype, kwargs: dict[str, Any]) -> None:
    """torch.optim casts floating-point state to the parameter dtype on load; danlu keeps the saved dtypes."""
    pairs = params(dtype)
    opt = danlu.create_optimizer(pairs, spec, lr=0.01, **kwargs)
    run(opt, pairs, range(3))
    saved = opt.state_dict()
    expected = {k: v.dtype for k, v in opt.state[pairs[0][1]].items() if isinstance(v, torch.Tensor)}
    fresh_pairs = params(dtype, seed=1)
    fresh = danlu.create_optimizer(fresh_pairs, spec, lr=0.01, **kwargs)
    fresh.load_state_dict(saved)
    assert {k: v.dtype for k, v in fresh.state[fresh_pairs[0][1]].items()} == expected
    with torch.no_grad():
        for (_, p), (_, q) in zip(fresh_pairs, pairs):
            p.copy_(q)
    run(opt, pairs, range(3, 5))
    run(fresh, fresh_pairs, range(3, 5))
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(fresh_pairs, pairs))
