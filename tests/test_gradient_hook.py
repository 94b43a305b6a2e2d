"""The gradient hook: once per applied step, over all groups, after accumulation's mean, never into ``.grad``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import danlu
from danlu.derivations import Derivation


class Recorder(Derivation):
    """Records the gradients it is shown and halves them for the step."""

    name, title = "recorder", "Recorder"
    has_gradient_hook = True

    def __init__(self) -> None:
        self.seen: list[list[torch.Tensor]] = []

    def transform_gradients(self, host: Any, ctx: Any) -> None:
        self.seen.append([ctx.gradient(p).clone() for _, p in ctx.params_with_gradient()])
        for _, p in ctx.params_with_gradient():
            ctx.scale(p, 0.5)


BASES = {
    "danlu.adam native": (danlu.Adam, {}),
    "danlu.adam foreach": (danlu.Adam, {"foreach": True}),
    "danlu.adam loop": (danlu.Adam, {"foreach": False}),
    "torch.adam": (torch.optim.Adam, {}),
}


def params() -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((3, 4), (4,), (2,))]


def grads(call: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + call)
    return [torch.randn(s, generator=gen) for s in ((3, 4), (4,), (2,))]


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("inside", [True, False], ids=["hook-inside-accum", "hook-outside-accum"])
def test_hook_sees_the_mean_once_per_applied_step_over_all_groups(base, inside):
    cls, extra = BASES[base]
    recorder = Recorder()
    hooked = danlu.derive.extend_with(cls, recorder)
    Opt = danlu.extend_with_gradient_accumulation(hooked) if inside else danlu.derive.extend_with(
        danlu.extend_with_gradient_accumulation(cls), recorder
    )
    ps = params()
    opt = Opt([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.05}], lr=0.1, grad_accum_steps=3, **extra)
    reference_ps = params()
    reference = cls([{"params": reference_ps[:2]}, {"params": reference_ps[2:], "lr": 0.05}], lr=0.1, **extra)
    for cycle in range(2):
        calls = [grads(3 * cycle + i) for i in range(3)]
        for gs in calls:
            kept = [g.clone() for g in gs]
            for p, g in zip(ps, gs):
                p.grad = g
            opt.step()
            for p, g, k in zip(ps, gs, kept):
                assert p.grad is g and torch.equal(g, k)  # the caller's gradient is never written
        assert len(recorder.seen) == cycle + 1  # once per applied step, not per call
        mean = [(calls[0][i] + calls[1][i] + calls[2][i]) / 3 for i in range(3)]
        for shown, expected in zip(recorder.seen[-1], mean):
            torch.testing.assert_close(shown, expected, rtol=1e-6, atol=1e-7)
        for p, m in zip(reference_ps, mean):
            p.grad = m * 0.5
        reference.step()
        for p, q in zip(ps, reference_ps):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", [danlu.Adam, danlu.SGD, torch.optim.SGD], ids=["danlu.adam", "danlu.sgd", "torch.sgd"])
def test_accumulation_leaves_the_callers_grad_alone(base):
    """The example of issue 12 (defect 3): a buffered gradient of 1, then ``w.grad = g`` with g = 3."""
    w = torch.nn.Parameter(torch.zeros(4))
    opt = danlu.extend_with_gradient_accumulation(base)([w], lr=0.1, grad_accum_steps=2)
    w.grad = torch.ones(4)
    opt.step()
    g = torch.full((4,), 3.0)
    w.grad = g
    opt.step()
    assert torch.equal(g, torch.full((4,), 3.0))
    assert w.grad is g
    assert torch.equal(opt.state[w]["accum.grad"], torch.zeros(4))


def test_native_pass_forms_the_mean_without_writing_the_gradient():
    w = torch.nn.Parameter(torch.zeros(1000))
    before = danlu._fused.STATS["native_tensors"]
    opt = danlu.extend_with_gradient_accumulation(danlu.Adam)([w], lr=0.1, grad_accum_steps=2)
    w.grad = torch.ones(1000)
    opt.step()
    g = torch.full((1000,), 3.0)
    w.grad = g
    opt.step()
    if danlu._native.load() is not None:
        assert danlu._fused.STATS["native_tensors"] == before + 1
    assert torch.equal(g, torch.full((1000,), 3.0))
    reference = torch.nn.Parameter(torch.zeros(1000))
    ref = danlu.Adam([reference], lr=0.1, foreach=False)
    reference.grad = torch.full((1000,), 2.0)
    ref.step()
    assert torch.equal(w.detach(), reference.detach())
