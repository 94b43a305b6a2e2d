"""Long runs: 10 000 calls of a derived stack keep the state and the memory flat."""

from __future__ import annotations

import gc
import math
import time
import tracemalloc

import torch

import danlu

CALLS = 10_000


def state_footprint(opt: torch.optim.Optimizer) -> tuple[int, int, list[tuple[str, ...]]]:
    """(tensors, bytes, key sets) of the optimizer state."""
    tensors = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    keys = sorted(tuple(sorted(s)) for s in opt.state.values())
    return len(tensors), sum(t.numel() * t.element_size() for t in tensors), keys


def test_ten_thousand_calls_of_a_derived_stack_do_not_grow() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(12, 4), torch.nn.Flatten(), torch.nn.Linear(8, 3), torch.nn.LayerNorm(3))
    opt = danlu.create_optimizer(
        model,
        "adamw+lazy+paramwise_lr+piecewise_linear_lr+gradient_accumulation+lookahead+ema+skip_nonfinite",
        lr=1e-3,
        include_in_lazy_optimization=["0.weight"],
        paramwise_lr_schedule={"2.": 0.5},
        lr_schedule={0: 0.0, 1000: 1.0, 4000: 0.1},
        grad_accum_steps=4,
        steps_per_slow_update=5,
        ema_momentum=0.999,
    )
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=generator) * 0.1 for p in params] for _ in range(16)]
    for g in grads:
        g[0][torch.randperm(12, generator=generator)[:6]] = 0  # embedding rows without gradient

    def call(i: int) -> None:
        for p, g in zip(params, grads[i % len(grads)]):
            p.grad = g
        if i % 997 == 0:
            params[-1].grad = torch.full_like(params[-1], math.nan)  # now and then a non-finite call
        opt.step()

    start = time.perf_counter()
    for i in range(1000):
        call(i)
    footprint = state_footprint(opt)
    attributes = set(opt.__dict__)
    gc.collect()
    objects = len(gc.get_objects())
    for i in range(1000, CALLS - 500):
        call(i)
    gc.collect()
    tracemalloc.start()  # only over the last calls: tracing every allocation is slow
    baseline = tracemalloc.get_traced_memory()[0]
    for i in range(CALLS - 500, CALLS):
        call(i)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - baseline
    tracemalloc.stop()
    new_objects = len(gc.get_objects()) - objects
    elapsed = time.perf_counter() - start

    assert state_footprint(opt) == footprint, "the state gained tensors, bytes or keys"
    assert set(opt.__dict__) == attributes, "the optimizer gained attributes"
    assert new_objects < 200, f"{new_objects} more Python objects after {CALLS - 1000} calls"
    assert grown < 16 * 1024, f"Python memory grew by {grown} bytes over the last 500 calls"
    skips = len([i for i in range(CALLS) if i % 997 == 0])
    group = opt.param_groups[0]
    assert group["nonfinite_skips"] == skips
    assert group["calls"] == CALLS - skips and group["applied_steps"] == (CALLS - skips) // 4
    assert all(torch.isfinite(p).all() for p in params)
    with opt.ema_weights():
        assert all(torch.isfinite(p).all() for p in params)
    assert elapsed < 120, f"{CALLS} calls took {elapsed:.0f}s"
