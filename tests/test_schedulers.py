"""torch.optim.lr_scheduler with danlu's optimizers and with derived torch.optim optimizers.

The rule under test: an LR scheduler owns ``group["lr"]`` (the base lr); the derivations multiply
it inside the step (``extend_with_piecewise_linear_lr`` by the schedule of applied steps,
``extend_with_parameter_wise_lr`` by the tensor's factor, ``grouping.extend_with_lr_scale`` by the
group's scale) and never write it back. With SGD and a gradient of 1 the change of a parameter is
exactly ``-lr_t``, so the expected numbers below are exact (powers of two).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim import lr_scheduler as S

import danlu
from danlu.grouping import extend_with_lr_scale


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _cases():
    """(id, optimizer class, extra kwargs): danlu bases, derived danlu, derived torch.optim."""
    return [
        ("danlu.SGD", danlu.SGD, {}),
        ("danlu.SGD+ema", danlu.extend_with_exponential_moving_average(danlu.SGD), {"ema_momentum": 0.9}),
        ("torch.SGD+lookahead", danlu.extend_with_lookahead(torch.optim.SGD), {"steps_per_slow_update": 1, "slow_step_size": 1.0}),
        ("torch.SGD+paramwise", danlu.extend_with_parameter_wise_lr(torch.optim.SGD), {"paramwise_lr_schedule": {"w": 1.0}}),
    ]


SCHEDULERS = {
    # name: (factory(opt), lrs of the first 6 steps for a base lr of 1.0)
    "LambdaLR": (lambda o: S.LambdaLR(o, lambda t: 1.0 / 2**t), [1, 0.5, 0.25, 0.125, 0.0625, 0.03125]),
    "StepLR": (lambda o: S.StepLR(o, step_size=2, gamma=0.5), [1, 1, 0.5, 0.5, 0.25, 0.25]),
    "CosineAnnealingLR": (
        lambda o: S.CosineAnnealingLR(o, T_max=4, eta_min=0.0),
        [(1 + math.cos(math.pi * t / 4)) / 2 for t in range(5)] + [(1 + math.cos(math.pi * 5 / 4)) / 2],
    ),
    "LinearLR": (lambda o: S.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=3), [0.25, 0.5, 0.75, 1, 1, 1]),
    "SequentialLR": (
        lambda o: S.SequentialLR(
            o, [S.LinearLR(o, start_factor=0.5, total_iters=2), S.StepLR(o, step_size=1, gamma=0.5)], milestones=[2]
        ),
        [0.5, 0.75, 1, 0.5, 0.25, 0.125],
    ),
    "OneCycleLR": (
        lambda o: S.OneCycleLR(o, max_lr=1.0, total_steps=6, pct_start=0.5, anneal_strategy="linear", cycle_momentum=False,
                               div_factor=4.0, final_div_factor=1.0),
        None,  # compared with the same scheduler on torch.optim.SGD
    ),
    "MultiStepLR": (lambda o: S.MultiStepLR(o, milestones=[1, 3], gamma=0.5), [1, 0.5, 0.5, 0.25, 0.25, 0.25]),
    "ExponentialLR": (lambda o: S.ExponentialLR(o, gamma=0.5), [1, 0.5, 0.25, 0.125, 0.0625, 0.03125]),
    "CosineAnnealingWarmRestarts": (lambda o: S.CosineAnnealingWarmRestarts(o, T_0=2), [1, 0.5, 1, 0.5, 1, 0.5]),
    "CyclicLR": (
        lambda o: S.CyclicLR(o, base_lr=0.25, max_lr=1.0, step_size_up=2, cycle_momentum=False),
        [0.25, 0.625, 1.0, 0.625, 0.25, 0.625],
    ),
}


def _run(cls, kwargs, make_scheduler, steps=6, plateau_metrics=None):
    w = torch.nn.Parameter(torch.zeros(2))
    opt = cls([("w", w)], lr=1.0, **kwargs)
    sched = make_scheduler(opt)
    lrs, deltas = [], []
    for t in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        before = w.detach().clone()
        w.grad = torch.ones(2)
        opt.step()
        deltas.append((before - w.detach())[0].item())
        if plateau_metrics is not None:
            sched.step(plateau_metrics[t])
        else:
            sched.step()
    return lrs, deltas


def _reference(make_scheduler, steps=6):
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=1.0)
    sched = make_scheduler(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        w.grad = torch.ones(2)
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_scheduler_sets_the_lr_that_the_step_uses(case, sched_name):
    _, cls, kwargs = case
    make, expected = SCHEDULERS[sched_name]
    if expected is None:
        expected = _reference(make)
    lrs, deltas = _run(cls, kwargs, make)
    assert lrs == pytest.approx(expected, abs=1e-15)
    # the parameter moved by exactly lr * grad: the scheduler's lr is the lr of the step
    assert deltas == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_reduce_lr_on_plateau(case):
    _, cls, kwargs = case
    metrics = [1.0, 0.5, 0.5, 0.5, 0.5, 0.5]  # improves once, then plateaus
    lrs, deltas = _run(cls, kwargs, lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=1), plateau_metrics=metrics)
    assert lrs == [1, 1, 1, 1, 0.5, 0.5]
    assert deltas == lrs


@pytest.mark.parametrize("cls", [danlu.Adam, danlu.NAdam, danlu.RAdam, danlu.Lion, danlu.AdamW, danlu.Lamb, danlu.SGD, danlu.RMSprop])
def test_cycle_momentum_finds_betas_or_momentum(cls):
    opt = cls([("w", torch.nn.Parameter(torch.zeros(2)))], lr=1e-3)
    sched = S.CyclicLR(opt, base_lr=1e-4, max_lr=1e-3, step_size_up=2)  # cycle_momentum=True
    key = "betas" if "betas" in opt.defaults else "momentum"
    first = opt.param_groups[0][key]
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    opt.step()
    sched.step()
    assert opt.param_groups[0][key] != first


def test_one_cycle_cycles_adam_betas_and_sgd_momentum():
    """OneCycleLR(cycle_momentum=True) needs a ``momentum`` or ``betas`` key: danlu's Adam and SGD have one."""
    p = torch.nn.Parameter(torch.zeros(3))
    q = torch.nn.Parameter(torch.zeros(3))
    adam = danlu.AdamW([p], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay_rate=0.0)
    ref = torch.optim.Adam([q], lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    sa = S.OneCycleLR(adam, max_lr=1e-2, total_steps=10, base_momentum=0.8, max_momentum=0.95)
    sr = S.OneCycleLR(ref, max_lr=1e-2, total_steps=10, base_momentum=0.8, max_momentum=0.95)
    gen = torch.Generator().manual_seed(0)
    seen_beta1 = set()
    for _ in range(10):
        g = torch.randn(3, generator=gen)
        p.grad, q.grad = g.clone(), g.clone()
        adam.step()
        ref.step()
        seen_beta1.add(round(adam.param_groups[0]["betas"][0], 6))
        assert adam.param_groups[0]["betas"] == ref.param_groups[0]["betas"]
        sa.step()
        sr.step()
    assert len(seen_beta1) > 3
    torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-15)

    sgd = danlu.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    sched = S.OneCycleLR(sgd, max_lr=1.0, total_steps=4)
    assert sgd.param_groups[0]["momentum"] == pytest.approx(0.95)
    sgd.param_groups[0]["params"][0].grad = torch.ones(1)
    sgd.step()
    sched.step()
    assert sgd.param_groups[0]["momentum"] < 0.95


@pytest.mark.parametrize("base", [danlu.SGD, torch.optim.SGD], ids=["danlu", "torch"])
def test_piecewise_linear_lr_multiplies_the_scheduler_lr(base):
    """lr_t = scheduler lr x piecewise multiplier of the applied steps; group["lr"] is the scheduler's alone."""
    cls = danlu.extend_with_piecewise_linear_lr(base)
    w = torch.nn.Parameter(torch.zeros(1))
    opt = cls([w], lr=1.0, lr_schedule={2: 1.0, 4: 0.5})  # 0, .5, 1, .75, .5, .5, ...
    sched = S.StepLR(opt, step_size=1, gamma=0.5)  # 1, .5, .25, .125, ...
    deltas, lrs = [], []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        before = w.item()
        w.grad = torch.ones(1)
        opt.step()
        sched.step()
        deltas.append(before - w.item())
    assert lrs == [1, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    assert deltas == [0.0, 0.25, 0.25, 0.09375, 0.03125, 0.015625]


@pytest.mark.parametrize("base", [danlu.SGD, torch.optim.SGD], ids=["danlu", "torch"])
def test_parameter_wise_lr_multiplies_the_scheduler_lr(base):
    cls = danlu.extend_with_parameter_wise_lr(base)
    model = torch.nn.Linear(1, 1)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = cls(model.named_parameters(), lr=1.0, paramwise_lr_schedule={"bias": 0.25})
    sched = S.LambdaLR(opt, lambda t: [1.0, 0.5, 2.0][t % 3])
    got = []
    for _ in range(3):
        w0, b0 = model.weight.item(), model.bias.item()
        model.weight.grad = torch.ones(1, 1)
        model.bias.grad = torch.ones(1)
        opt.step()
        sched.step()
        got.append((w0 - model.weight.item(), b0 - model.bias.item()))
    assert got == [(1.0, 0.25), (0.5, 0.125), (2.0, 0.5)]
    assert opt.param_groups[0]["lr"] == 1.0  # back at the first factor; nothing wrote a scaled lr


def test_all_multipliers_compose():
    """scheduler x piecewise x lr_scale x paramwise, on a derived torch.optim.SGD."""
    cls = extend_with_lr_scale(
        danlu.extend_with_parameter_wise_lr(danlu.extend_with_piecewise_linear_lr(torch.optim.SGD))
    )
    a = torch.nn.Parameter(torch.zeros(1))
    b = torch.nn.Parameter(torch.zeros(1))
    opt = cls(
        [{"params": [("a.weight", a)], "lr_scale": 0.5}, {"params": [("b.weight", b)]}],
        lr=1.0,
        lr_schedule={0: 1.0, 1: 0.5},
        paramwise_lr_schedule={"b.": 0.25},
    )
    sched = S.StepLR(opt, step_size=1, gamma=0.5)
    got = []
    for _ in range(2):
        a0, b0 = a.item(), b.item()
        a.grad = torch.ones(1)
        b.grad = torch.ones(1)
        opt.step()
        sched.step()
        got.append((a0 - a.item(), b0 - b.item()))
    # step 1: lr 1, piecewise 1;  a: 1*1*0.5 = 0.5, b: 1*1*0.25 = 0.25
    # step 2: lr .5, piecewise .5; a: .25*.5 = 0.125, b: .25*.25 = 0.0625
    assert got == [(0.5, 0.25), (0.125, 0.0625)]
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]


def test_scheduler_and_accumulation_count_calls_not_steps():
    """A torch scheduler stepped on every call advances on buffering calls too; step it on applied steps."""
    cls = danlu.extend_with_gradient_accumulation(danlu.SGD)
    w = torch.nn.Parameter(torch.zeros(1))
    opt = cls([w], lr=1.0, grad_accum_steps=2)
    sched = S.StepLR(opt, step_size=1, gamma=0.5)
    applied = opt.param_groups[0]["applied_steps"]
    deltas = []
    for _ in range(6):
        before = w.item()
        w.grad = torch.ones(1)
        opt.step()
        if opt.param_groups[0]["applied_steps"] != applied:  # the recommended pattern
            applied = opt.param_groups[0]["applied_steps"]
            sched.step()
        deltas.append(before - w.item())
    assert deltas == [0.0, 1.0, 0.0, 0.5, 0.0, 0.25]


@pytest.mark.parametrize("base", [danlu.Adam, torch.optim.Adam], ids=["danlu", "torch"])
def test_scheduler_state_dict_roundtrip_with_derived_optimizer(base):
    """Optimizer and scheduler checkpoints resume bit-identically under a schedule."""
    cls = danlu.extend_with_piecewise_linear_lr(danlu.extend_with_weight_decay(base))

    def make():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        opt = cls(model.named_parameters(), lr=1e-2, weight_decay_rate=0.1, lr_schedule={3: 1.0})
        sched = S.SequentialLR(opt, [S.LinearLR(opt, 0.5, total_iters=2), S.CosineAnnealingLR(opt, T_max=5)], milestones=[2])
        return model, opt, sched

    def train(model, opt, sched, start, stop):
        for t in range(start, stop):
            gen = torch.Generator().manual_seed(t)
            x = torch.randn(4, 3, generator=gen)
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            sched.step()

    m1, o1, s1 = make()
    train(m1, o1, s1, 0, 8)
    m2, o2, s2 = make()
    train(m2, o2, s2, 0, 4)
    saved = (m2.state_dict(), o2.state_dict(), s2.state_dict())
    m3, o3, s3 = make()
    m3.load_state_dict(saved[0])
    o3.load_state_dict(saved[1])
    s3.load_state_dict(saved[2])
    train(m3, o3, s3, 4, 8)
    for p1, p3 in zip(m1.parameters(), m3.parameters()):
        assert torch.equal(p1, p3)
