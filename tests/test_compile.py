"""A compiled step of a derived stack: fullgraph, no recompilation over a changing schedule, same numbers."""

from __future__ import annotations

import os

import pytest
import torch

import danlu
from danlu.compiled import compile_step

D = danlu


def _stack():
    return D.extend_with_lookahead(D.extend_with_gradient_accumulation(D.extend_with_piecewise_linear_lr(D.AdamW)))


def _setup(dtype=torch.float64):
    torch.manual_seed(0)
    named = [
        (n, torch.nn.Parameter(torch.randn(s, dtype=dtype)))
        for n, s in (("a.weight", (6, 5)), ("a.bias", (5,)), ("b.weight", (4,)))
    ]
    kw = dict(
        lr=0.05,
        lr_schedule={0: 0.0, 20: 1.0, 60: 0.1},
        grad_accum_steps=2,
        steps_per_slow_update=5,
        weight_decay_rate=0.1,
        exclude_from_weight_decay=["bias"],
    )
    return named, kw


class Counter:
    def __init__(self):
        self.compiles = 0

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        return gm.forward


def _run(backend, calls=100, dtype=torch.float64, change_lr_at=70):
    named_c, kw = _setup(dtype)
    named_e, _ = _setup(dtype)
    compiled_opt = _stack()(named_c, **kw)
    eager_opt = _stack()(named_e, foreach=False, **kw)
    step = compile_step(compiled_opt, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for call in range(calls):
        if call == change_lr_at:  # an LR scheduler changing the base lr: no recompilation either
            compiled_opt.param_groups[0]["lr"] = eager_opt.param_groups[0]["lr"] = 0.02
        for (_, pc), (_, pe) in zip(named_c, named_e):
            g = torch.randn(pc.shape, generator=gen, dtype=dtype)
            pc.grad, pe.grad = g.clone(), g.clone()
        step()
        eager_opt.step()
        for (name, pc), (_, pe) in zip(named_c, named_e):
            tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
            torch.testing.assert_close(pc.detach(), pe.detach(), **tol, msg=lambda m: f"call {call} {name}: {m}")
    assert compiled_opt.param_groups[0]["applied_steps"] == eager_opt.param_groups[0]["applied_steps"] == calls // 2
    sc, se = compiled_opt.state_dict(), eager_opt.state_dict()
    for key in se["state"]:
        for name, value in se["state"][key].items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(sc["state"][key][name], value, rtol=1e-10, atol=1e-12)
    return compiled_opt


def test_compiled_stack_does_not_recompile_over_100_steps():
    torch._dynamo.reset()
    counter = Counter()
    torch._dynamo.utils.counters.clear()
    _run(counter)
    assert counter.compiles == 1, f"compiled {counter.compiles} times"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_unsupported_stacks_say_so():
    with pytest.raises(NotImplementedError):
        compile_step(D.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1))
    with pytest.raises(NotImplementedError):
        compile_step(D.LazyAdam([torch.nn.Parameter(torch.zeros(2))]))


@pytest.mark.skipif(not os.environ.get("DANLU_SLOW_TESTS"), reason="inductor compile takes minutes here; DANLU_SLOW_TESTS=1")
def test_inductor_compiled_stack_matches_float32():
    torch._dynamo.reset()
    _run("inductor", calls=30, dtype=torch.float32, change_lr_at=20)
