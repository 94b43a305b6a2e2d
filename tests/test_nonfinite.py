"""Non-finite gradients: the policy, ``extend_with_skip_nonfinite`` and ``torch.amp.GradScaler``.

The policy (docs/distributed.md, "Non-finite gradients"): danlu does not look at the values of the
gradients by default (that costs a pass over them, and a synchronization), so an inf or nan
gradient goes into the update as in ``torch.optim``. ``extend_with_skip_nonfinite`` drops such a
call entirely: nothing changes but the ``nonfinite_skips`` counter. ``GradScaler`` does the same
from outside (it does not call ``step()``): a skipped call is not a step for any derivation.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

import danlu
from cases import FOREIGN_CASES, OPTIMIZER_CASES
from danlu.derivations.skip_nonfinite import CONSECUTIVE_SKIPS, SKIPS

STACK = "+gradient_accumulation+piecewise_linear_lr+lookahead+ema+skip_nonfinite"
STACK_KWARGS = dict(grad_accum_steps=2, lr_schedule={0: 0.5, 4: 1.0}, steps_per_slow_update=2, ema_momentum=0.9)

STACK_NAMES = {"gradient_accumulation", "piecewise_linear_lr", "lookahead", "ema", "skip_nonfinite"}
BASES: list[tuple[str, dict[str, Any]]] = [
    (case.spec, dict(case.kwargs))
    for case in OPTIMIZER_CASES + FOREIGN_CASES
    if case.spec and not set(case.holds) & STACK_NAMES
]


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2)).double()


def grads_for(net: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in net.parameters()]


def set_grads(net: torch.nn.Module, grads: list[torch.Tensor]) -> None:
    for p, g in zip(net.parameters(), grads):
        p.grad = g.clone()


def snapshot(opt: torch.optim.Optimizer, net: torch.nn.Module) -> dict[str, Any]:
    return {"params": [p.detach().clone() for p in net.parameters()], "state": copy.deepcopy(opt.state_dict())}


def assert_same(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or ((a.isnan() == b.isnan()).all() and torch.equal(a.nan_to_num(), b.nan_to_num())), path
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def without_skip_counters(state_dict: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(state_dict)
    for group in out["param_groups"]:
        group.pop(SKIPS, None)
        group.pop(CONSECUTIVE_SKIPS, None)
    return out


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("base,kwargs", BASES, ids=[b for b, _ in BASES])
def test_a_nonfinite_call_changes_nothing_but_the_skip_counter(base: str, kwargs: dict[str, Any], bad: float) -> None:
    net = model()
    opt = danlu.create_optimizer(net, base + STACK, **kwargs, **STACK_KWARGS)
    for call in range(5):  # ends on a buffering call: the accumulation buffer is not empty
        set_grads(net, grads_for(net, call))
        opt.step()
    for where in range(2):  # once on a buffering call, once on an applying call
        before = snapshot(opt, net)
        grads = grads_for(net, 100 + where)
        grads[where][0] = bad
        set_grads(net, grads)
        opt.step()
        after = snapshot(opt, net)
        assert_same(before["params"], after["params"], "params")
        assert_same(without_skip_counters(before["state"]), without_skip_counters(after["state"]), "state_dict")
        assert opt.param_groups[0][SKIPS] == where + 1
        set_grads(net, grads_for(net, 200 + where))
        opt.step()  # a finite call: counted, consecutive skips reset
        assert opt.param_groups[0][CONSECUTIVE_SKIPS] == 0


@pytest.mark.parametrize("base,kwargs", BASES[::3], ids=[b for b, _ in BASES[::3]])
def test_skipped_calls_are_not_calls(base: str, kwargs: dict[str, Any]) -> None:
    """A run with non-finite calls inserted equals the run without them, bit for bit."""
    clean_net, dirty_net = model(), model()
    clean = danlu.create_optimizer(clean_net, base + STACK, **kwargs, **STACK_KWARGS)
    dirty = danlu.create_optimizer(dirty_net, base + STACK, **kwargs, **STACK_KWARGS)
    for call in range(9):
        grads = grads_for(clean_net, call)
        set_grads(clean_net, grads)
        clean.step()
        if call in (1, 4, 5):
            poisoned = [g.clone() for g in grads]
            poisoned[-1].fill_(math.nan)
            set_grads(dirty_net, poisoned)
            dirty.step()
        set_grads(dirty_net, grads)
        dirty.step()
    assert_same([p.detach() for p in clean_net.parameters()], [p.detach() for p in dirty_net.parameters()])
    assert_same(without_skip_counters(clean.state_dict()), without_skip_counters(dirty.state_dict()))
    assert dirty.param_groups[0][SKIPS] == 3 and clean.param_groups[0][SKIPS] == 0
    with clean.ema_weights(), dirty.ema_weights():
        assert_same([p.detach() for p in clean_net.parameters()], [p.detach() for p in dirty_net.parameters()])


def test_nonfinite_in_a_sparse_gradient_is_skipped() -> None:
    emb = torch.nn.Embedding(6, 3, sparse=True).double()
    opt = danlu.extend_with_skip_nonfinite(danlu.LazyAdam)(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    opt.step()
    before = emb.weight.detach().clone()
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad()
    emb.weight.grad = torch.sparse_coo_tensor(torch.tensor([[3]]), torch.tensor([[1.0, math.inf, 0.0]], dtype=torch.float64), (6, 3))
    opt.step()
    assert torch.equal(emb.weight.detach(), before)
    assert_same(without_skip_counters(state), without_skip_counters(opt.state_dict()))
    assert opt.param_groups[0][SKIPS] == 1


def test_max_consecutive_skips_stops_a_diverged_run() -> None:
    w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = danlu.extend_with_skip_nonfinite(danlu.Adam)([w], lr=0.1, max_consecutive_skips=2)
    w.grad = torch.tensor([1.0, math.nan, 0.0], dtype=torch.float64)
    opt.step()
    opt.step()
    state = copy.deepcopy(opt.state_dict())
    with pytest.raises(FloatingPointError, match="max_consecutive_skips=2"):
        opt.step()
    assert_same(state, opt.state_dict())
    assert torch.equal(w.detach(), torch.ones(3, dtype=torch.float64))
    w.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert opt.param_groups[0][CONSECUTIVE_SKIPS] == 0 and opt.param_groups[0][SKIPS] == 2
    w.grad = torch.full((3,), math.inf, dtype=torch.float64)
    opt.step()  # the count of consecutive skips started again
    assert opt.param_groups[0][SKIPS] == 3


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_max_consecutive_skips_is_validated(bad: Any) -> None:
    error = TypeError if not isinstance(bad, int) or isinstance(bad, bool) else ValueError
    with pytest.raises(error, match="max_consecutive_skips"):
        danlu.extend_with_skip_nonfinite(danlu.Adam)([torch.nn.Parameter(torch.ones(1))], max_consecutive_skips=bad)


def test_factory_names_and_state_dict_round_trip() -> None:
    net = model()
    opt = danlu.create_optimizer(net, "adamw+nonfinite", lr=0.01)
    assert type(opt).__name__.endswith("WithSkipNonfinite")
    set_grads(net, [torch.full_like(p, math.nan) for p in net.parameters()])
    opt.step()
    saved = opt.state_dict()
    fresh = danlu.create_optimizer(model(), "adamw+skip_nonfinite", lr=0.01)
    fresh.load_state_dict(saved)
    assert fresh.param_groups[0][SKIPS] == 1


def test_without_the_derivation_a_nonfinite_gradient_reaches_the_parameters() -> None:
    """The default policy, as torch.optim: no check, no synchronization, nan goes in."""
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = danlu.Adam([w], lr=0.1)
    w.grad = torch.tensor([math.nan, 1.0], dtype=torch.float64)
    opt.step()
    assert math.isnan(w[0].item()) and w[1].item() == pytest.approx(0.9)


# ------------------------------------------------------------------------------ GradScaler
def scaler_run(spec: str, overflow_at: tuple[int, ...], scaled: bool, calls: int = 10) -> tuple[Any, Any, list[int]]:
    net = model()
    opt = danlu.create_optimizer(net, spec, lr=0.01, **STACK_KWARGS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3) if scaled else None
    scales = []
    for call in range(calls):
        g = torch.Generator().manual_seed(call)
        x = torch.randn(5, 4, generator=g, dtype=torch.float64)
        loss = net(x).pow(2).mean()
        if scaler is None:
            if call in overflow_at:
                continue  # the reference: the call never happens
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if call in overflow_at:
                next(net.parameters()).grad[0, 0] = math.inf
            scaler.step(opt)
            scaler.update()
            scales.append(int(scaler.get_scale()))
        opt.zero_grad()
    return net, opt, scales


@pytest.mark.parametrize("spec", ["adamw" + STACK, "torch.AdamW" + STACK, "lamb+gradient_accumulation+piecewise_linear_lr+lookahead+ema"])
def test_grad_scaler_skips_are_not_steps_for_any_derivation(spec: str) -> None:
    overflow = (2, 3, 7)
    ref_net, ref_opt, _ = scaler_run(spec, overflow, scaled=False)
    net, opt, scales = scaler_run(spec, overflow, scaled=True)
    assert scales[2] == scales[1] // 2 and scales[3] == scales[2] // 2  # the scaler saw the overflows
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
    for key in ("applied_steps", "calls"):
        assert opt.param_groups[0][key] == ref_opt.param_groups[0][key]
    if SKIPS in opt.param_groups[0]:
        assert opt.param_groups[0][SKIPS] == 0  # the optimizer never saw the inf: the scaler did not call step()
    with opt.ema_weights(), ref_opt.ema_weights():
        for p, q in zip(net.parameters(), ref_net.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("value", "dtype", "skipped"),
    [
        (-math.inf, torch.float32, True),
        (math.nan, torch.bfloat16, True),
        (math.inf, torch.float16, True),
        (65504.0, torch.float16, False),  # the largest finite float16
        (complex(3e38, 3e38), torch.complex64, False),  # finite, though its magnitude is not a float32
        (complex(1.0, math.nan), torch.complex64, True),
    ],
)
def test_the_verdict_is_exact_for_every_dtype(value: Any, dtype: torch.dtype, skipped: bool) -> None:
    w = torch.nn.Parameter(torch.zeros(5, dtype=dtype))
    opt = danlu.extend_with_skip_nonfinite(danlu.SGD)([w], lr=0.0)
    grad = torch.zeros(5, dtype=dtype)
    grad[3] = value
    w.grad = grad
    opt.step()
    assert opt.param_groups[0][SKIPS] == int(skipped)
    assert int(opt.param_groups[0]["calls"]) == int(not skipped)
