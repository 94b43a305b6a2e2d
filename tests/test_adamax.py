"""Adamax: equals torch.optim.Adamax, its fast path equals its per-tensor reference, and it resumes exactly."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import danlu
from danlu import _fused, _native

SHAPES = [(7, 5), (11,), (3, 4, 2)]
STEPS = 20


def _params(dtype: torch.dtype, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in SHAPES]


def _grads(call: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + call)
    grads = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    grads[1][call % SHAPES[1][0]] = 0.0  # a zero gradient: exp_inf decays, bounded below by eps
    if call % 5 == 4:
        grads[0] = grads[0] * 50  # a jump in the infinity norm
    return grads


def _set(params: list[torch.nn.Parameter], grads: list[torch.Tensor]) -> None:
    for p, g in zip(params, grads):
        p.grad = g.clone()


def _lambda(step: int) -> float:
    return 1.0 / (1.0 + 0.1 * step)


@pytest.mark.parametrize("foreach", [None, True, False], ids=["native", "foreach", "reference"])
@pytest.mark.parametrize(
    "kw",
    [dict(lr=0.01), dict(lr=0.02, betas=(0.5, 0.9), eps=1e-3), dict(lr=0.01, betas=(0.0, 0.0))],
    ids=["default", "options", "zero_betas"],
)
def test_equals_torch_adamax_float64(kw, foreach):
    ours_params, torch_params = _params(torch.float64), _params(torch.float64)
    ours = danlu.Adamax(ours_params, foreach=foreach, **kw)
    theirs = torch.optim.Adamax(torch_params, foreach=False, **kw)
    for call in range(STEPS):
        grads = _grads(call, torch.float64)
        _set(ours_params, grads)
        _set(torch_params, grads)
        ours.step()
        theirs.step()
        for a, b in zip(ours_params, torch_params):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-10)
    for a, b in zip(ours_params, torch_params):
        torch.testing.assert_close(ours.state[a]["exp_inf"], theirs.state[b]["exp_inf"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours.state[a]["exp_avg"], theirs.state[b]["exp_avg"], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("foreach", [None, False], ids=["native", "reference"])
def test_weight_decay_and_lr_schedule_equal_torch(foreach):
    """extend_with_weight_decay(Adamax) under LambdaLR is torch's Adamax with AdamW's decoupled decay first."""
    rate, lr = 0.1, 0.01
    ours_params, torch_params = _params(torch.float64), _params(torch.float64)
    ours = danlu.extend_with_weight_decay(danlu.Adamax)(ours_params, lr=lr, weight_decay_rate=rate, foreach=foreach)
    theirs = torch.optim.Adamax(torch_params, lr=lr, foreach=False)
    ours_schedule = torch.optim.lr_scheduler.LambdaLR(ours, _lambda)
    theirs_schedule = torch.optim.lr_scheduler.LambdaLR(theirs, _lambda)
    for call in range(STEPS):
        grads = _grads(call, torch.float64)
        _set(ours_params, grads)
        _set(torch_params, grads)
        with torch.no_grad():
            for p in torch_params:
                p.mul_(1 - theirs.param_groups[0]["lr"] * rate)
        ours.step()
        theirs.step()
        ours_schedule.step()
        theirs_schedule.step()
        for a, b in zip(ours_params, torch_params):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-10)


def _compare(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, where: str) -> None:
    if dtype == torch.float64:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{where}: {m}")
    else:
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-7, msg=lambda m: f"{where}: {m}")


STACKS = {
    "plain": ([], {}),
    "wd_lookahead_ema": (
        [danlu.extend_with_weight_decay, danlu.extend_with_lookahead, danlu.extend_with_exponential_moving_average],
        dict(weight_decay_rate=0.1, steps_per_slow_update=3, ema_momentum=0.8),
    ),
    "accumulation": ([danlu.extend_with_gradient_accumulation], dict(grad_accum_steps=2)),
    "lamb_style": (
        [danlu.extend_with_weight_decay, danlu.extend_with_layer_adaptation],
        dict(weight_decay_rate=0.1, exclude_from_layer_adaptation=["b"]),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("stack", list(STACKS))
def test_fast_path_equals_reference(stack, dtype):
    extends, stack_kw = STACKS[stack]
    cls = danlu.Adamax
    for extend in extends:
        cls = extend(cls)
    kw = dict(lr=0.01, **stack_kw)
    fast_params, ref_params = _params(dtype), _params(dtype)
    fast = cls([(f"p{i}.{'b' if p.dim() == 1 else 'w'}", p) for i, p in enumerate(fast_params)], **kw)
    ref = cls([(f"p{i}.{'b' if p.dim() == 1 else 'w'}", p) for i, p in enumerate(ref_params)], foreach=False, **kw)
    before = _fused.STATS["native_tensors"]
    for call in range(12):
        grads = _grads(call, dtype)
        _set(fast_params, grads)
        _set(ref_params, grads)
        fast.step()
        ref.step()
        for i, (a, b) in enumerate(zip(fast_params, ref_params)):
            _compare(a.detach(), b.detach(), dtype, f"call {call} param {i}")
            for key in ref.state[b]:
                if isinstance(ref.state[b][key], torch.Tensor):
                    _compare(fast.state[a][key], ref.state[b][key], dtype, f"call {call} state {key}")
    if _native.available():
        assert _fused.STATS["native_tensors"] > before


def test_nonfinite_gradient_propagates_like_torch():
    ours_p, torch_p = _params(torch.float64), _params(torch.float64)
    ours, theirs = danlu.Adamax(ours_p, lr=0.01), torch.optim.Adamax(torch_p, lr=0.01, foreach=False)
    grads = _grads(0, torch.float64)
    grads[0][0, 0] = math.nan
    grads[0][1, 1] = math.inf
    _set(ours_p, grads)
    _set(torch_p, grads)
    ours.step()
    theirs.step()
    for a, b in zip(ours_p, torch_p):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(ours.state[a]["exp_inf"], theirs.state[b]["exp_inf"], equal_nan=True)


@pytest.mark.parametrize("foreach", [None, False], ids=["native", "reference"])
def test_resume_is_bit_identical(foreach):
    cls = danlu.extend_with_lookahead(danlu.extend_with_weight_decay(danlu.Adamax))
    kw = dict(lr=0.01, weight_decay_rate=0.05, steps_per_slow_update=3, foreach=foreach)
    params = _params(torch.float32)
    opt = cls(params, **kw)
    for call in range(5):
        _set(params, _grads(call, torch.float32))
        opt.step()
    saved_state = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    for call in range(5, 12):
        _set(params, _grads(call, torch.float32))
        opt.step()
    resumed_params = _params(torch.float32, seed=1)
    with torch.no_grad():
        for p, saved in zip(resumed_params, saved_params):
            p.copy_(saved)
    resumed = cls(resumed_params, **kw)
    resumed.load_state_dict(saved_state)
    for call in range(5, 12):
        _set(resumed_params, _grads(call, torch.float32))
        resumed.step()
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)
    for a, b in zip(params, resumed_params):
        for key in ("exp_avg", "exp_inf", "lookahead.slow"):
            assert torch.equal(opt.state[a][key], resumed.state[b][key])


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        (dict(lr=-1.0), ValueError, "Invalid lr: -1.0 (expected a finite number >= 0)"),
        (dict(lr=math.nan), ValueError, "Invalid lr: nan (expected a finite number >= 0)"),
        (dict(betas=(1.0, 0.9)), ValueError, "Invalid beta parameter at index 0 (betas[0]): 1.0 (expected a finite number >= 0 and < 1)"),
        (dict(betas=(0.9, -0.1)), ValueError, "Invalid beta parameter at index 1 (betas[1]): -0.1 (expected a finite number >= 0 and < 1)"),
        (dict(betas=0.9), TypeError, "Invalid betas: expected a tuple of 2 numbers, got 0.9"),
        (dict(eps=-1e-8), ValueError, "Invalid eps: -1e-08 (expected a finite number >= 0)"),
        (dict(eps="a"), TypeError, "Invalid eps: expected a number, got str 'a'"),
    ],
)
def test_bad_hyperparameters_are_refused(kw, error, message):
    with pytest.raises(error) as raised:
        danlu.Adamax(_params(torch.float32), **kw)
    assert str(raised.value) == message


def test_create_optimizer_knows_adamax():
    named = [(f"layer.{i}.weight", p) for i, p in enumerate(_params(torch.float32))]
    opt = danlu.create_optimizer(named, "adamax+weight_decay", lr=0.01)
    assert isinstance(opt, danlu.Adamax)
    assert opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8 and opt.defaults["weight_decay_rate"] == 0.01
    assert danlu.Adamax(_params(torch.float32)).defaults["lr"] == 2e-3
