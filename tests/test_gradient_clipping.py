"""extend_with_gradient_clipping: Keras' formulas, the accumulation order, grad_norm, .grad untouched, bad input."""

from __future__ import annotations

import io
import math

import pytest
import torch

import danlu
from danlu import extend_with_gradient_accumulation as accum
from danlu import extend_with_gradient_clipping as clip

SHAPES = {"a.weight": (4, 3), "a.bias": (3,), "b.weight": (5,)}


def named(seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64))) for n, s in SHAPES.items()]


def grad_sequence(steps: int, scale: float = 3.0, seed: int = 1) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[scale * torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES.values()] for _ in range(steps)]


def keras_global(grads: list[torch.Tensor], c: float) -> list[torch.Tensor]:
    n = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    return [g * (c / max(n, c)) for g in grads]


def keras_per_tensor(grads: list[torch.Tensor], c: float) -> list[torch.Tensor]:
    return [g * (c / max(float(g.norm()), c)) for g in grads]


def run(opt: torch.optim.Optimizer, params: list[torch.Tensor], sequence: list[list[torch.Tensor]]) -> None:
    for grads in sequence:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("base", [danlu.Adam, danlu.SGD, torch.optim.Adam], ids=["adam", "sgd", "torch.adam"])
@pytest.mark.parametrize(
    "option,reference",
    [("global_clipnorm", keras_global), ("clipnorm", keras_per_tensor), ("clipvalue", lambda gs, c: [g.clamp(-c, c) for g in gs])],
)
def test_equals_the_base_on_keras_clipped_gradients(base, option, reference):
    c = 1.5
    sequence = grad_sequence(6)
    clipped_params = [p for _, p in named()]
    reference_params = [p for _, p in named()]
    kwargs = dict(lr=0.1)
    run(clip(base)(clipped_params, **kwargs, **{option: c}), clipped_params, sequence)
    run(base(reference_params, **kwargs), reference_params, [reference(gs, c) for gs in sequence])
    for p, q in zip(clipped_params, reference_params):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-14)


def test_global_norm_spans_every_group_and_grad_norm_is_pre_clip():
    params = [p for _, p in named()]
    opt = clip(danlu.SGD)([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], lr=1.0, global_clipnorm=1.0)
    assert opt.grad_norm is None
    grads = grad_sequence(1)[0]
    before = [p.detach().clone() for p in params]
    run(opt, params, [grads])
    expected_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    assert opt.grad_norm.dim() == 0
    assert opt.grad_norm.item() == pytest.approx(expected_norm, rel=1e-14)
    clipped = keras_global(grads, 1.0)
    for p, b, g, lr in zip(params, before, clipped, [1.0, 1.0, 0.5]):
        torch.testing.assert_close(p.detach(), b - lr * g, rtol=1e-14, atol=1e-15)


def test_matches_clip_grad_norm_with_a_torch_base_up_to_its_epsilon():
    """clip_grad_norm_'s factor is c / (n + 1e-6): the runs differ by about 1e-6 / n, relatively."""
    sequence = grad_sequence(5)
    ours = [p for _, p in named()]
    theirs = [p for _, p in named()]
    opt = clip(torch.optim.AdamW)(ours, lr=0.01, global_clipnorm=1.0)
    run(opt, ours, sequence)
    reference = torch.optim.AdamW(theirs, lr=0.01)
    for grads in sequence:
        for p, g in zip(theirs, grads):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(theirs, max_norm=1.0)
        reference.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert not torch.equal(p, q)  # the documented epsilon does show


@pytest.mark.parametrize("order", ["clip(accum)", "accum(clip)"])
def test_accumulation_clips_the_mean_in_either_order(order):
    k, c = 3, 1.0
    sequence = grad_sequence(9)
    cls = clip(accum(danlu.Adam)) if order == "clip(accum)" else accum(clip(danlu.Adam))
    params = [p for _, p in named()]
    run(cls(params, lr=0.1, grad_accum_steps=k, global_clipnorm=c), params, sequence)
    means = [[sum(gs[i] for gs in sequence[s : s + k]) / k for i in range(len(SHAPES))] for s in range(0, 9, k)]
    reference = [p for _, p in named()]
    run(danlu.Adam(reference, lr=0.1), reference, [keras_global(m, c) for m in means])
    for p, q in zip(params, reference):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
    per_micro_batch = [p for _, p in named()]
    clipped_each = [keras_global(gs, c) for gs in sequence]
    run(danlu.Adam(per_micro_batch, lr=0.1), per_micro_batch,
        [[sum(gs[i] for gs in clipped_each[s : s + k]) / k for i in range(len(SHAPES))] for s in range(0, 9, k)])
    assert not torch.allclose(params[0], per_micro_batch[0], rtol=1e-6)


@pytest.mark.parametrize(
    "spec,kwargs",
    [
        ("adamw+clip", {}),
        ("adamw+accum+clip", {"grad_accum_steps": 2}),
        ("adamw+clip+accum", {"grad_accum_steps": 2}),
        ("torch.SGD+accum+clip", {"grad_accum_steps": 2}),
        ("torch.SGD+clip", {}),
    ],
)
def test_step_never_writes_the_callers_grad(spec, kwargs):
    params = named()
    opt = danlu.create_optimizer(params, spec, lr=0.1, global_clipnorm=0.5, **kwargs)
    for grads in grad_sequence(4):
        kept = [g.clone() for g in grads]
        for (_, p), g in zip(params, grads):
            p.grad = g
        opt.step()
        for (_, p), g, k in zip(params, grads, kept):
            assert p.grad is g
            assert torch.equal(g, k)


def test_native_and_reference_paths_agree_in_float32():
    sequence = [[g.float() for g in gs] for gs in grad_sequence(6)]
    fast = [torch.nn.Parameter(p.detach().float()) for _, p in named()]
    oracle = [torch.nn.Parameter(p.detach().float()) for _, p in named()]
    run(clip(danlu.AdamW)(fast, lr=0.01, global_clipnorm=1.0), fast, sequence)
    run(clip(danlu.AdamW)(oracle, lr=0.01, global_clipnorm=1.0, foreach=False), oracle, sequence)
    for p, q in zip(fast, oracle):
        torch.testing.assert_close(p, q, rtol=2e-6, atol=2e-7)


def test_resume_mid_cycle_is_bit_identical():
    cls = clip(accum(danlu.AdamW))
    kwargs = dict(lr=0.05, grad_accum_steps=3, global_clipnorm=1.0)
    sequence = grad_sequence(10)
    straight = [p for _, p in named()]
    run(cls(straight, **kwargs), straight, sequence)
    first = [p for _, p in named()]
    opt = cls(first, **kwargs)
    run(opt, first, sequence[:4])
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach() for p in first]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = cls(resumed, **kwargs)
    opt2.load_state_dict(saved["opt"])
    run(opt2, resumed, sequence[4:])
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


def test_nonfinite_norm_without_skip_derivation_skips_with_a_warning():
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float32))
    opt = clip(danlu.Adam)([w], lr=0.1, global_clipnorm=1.0)
    w.grad = torch.tensor([3e38, 3e38])  # finite values whose norm overflows float32
    with pytest.warns(RuntimeWarning, match="the gradient norm is inf: this step is skipped"):
        opt.step()
    assert torch.equal(w.detach(), torch.ones(2))
    assert opt.state == {} or "exp_avg" not in opt.state.get(w, {})
    assert opt.param_groups[0]["applied_steps"] == 0


def test_nonfinite_norm_under_accumulation_drops_the_cycle():
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float32))
    opt = accum(clip(danlu.SGD))([w], lr=1.0, global_clipnorm=10.0, grad_accum_steps=2)
    for g in ([3e38, 3e38], [3e38, 3e38]):
        w.grad = torch.tensor(g)
        with pytest.warns(RuntimeWarning) if g is not None and opt.param_groups[0]["calls"] == 1 else _no_warning():
            opt.step()
    assert torch.equal(w.detach(), torch.ones(2))
    assert opt.state[w]["accum.grad"].abs().sum() == 0
    for g in ([1.0, 0.0], [3.0, 0.0]):
        w.grad = torch.tensor(g)
        opt.step()
    assert torch.equal(w.detach(), torch.tensor([-1.0, 1.0]))  # a fresh cycle: mean gradient 2


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_nonfinite_norm_follows_skip_nonfinite():
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float32))
    opt = danlu.extend_with_skip_nonfinite(clip(danlu.Adam))([w], lr=0.1, global_clipnorm=1.0, max_consecutive_skips=1)
    w.grad = torch.tensor([3e38, 3e38])
    opt.step()
    assert torch.equal(w.detach(), torch.ones(2))
    assert opt.param_groups[0]["nonfinite_skips"] == 1
    with pytest.raises(FloatingPointError, match="in 2 calls in a row"):
        opt.step()


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({}, ValueError, "exactly one of global_clipnorm, clipnorm, clipvalue; none was set"),
        ({"global_clipnorm": 1.0, "clipvalue": 1.0}, ValueError, "exactly one of .*; got global_clipnorm, clipvalue"),
        ({"global_clipnorm": 0.0}, ValueError, "global_clipnorm"),
        ({"clipnorm": -1.0}, ValueError, "clipnorm"),
        ({"clipvalue": float("inf")}, ValueError, "clipvalue"),
        ({"clipnorm": "1"}, TypeError, "clipnorm"),
    ],
)
def test_bad_input(kwargs, error, message):
    with pytest.raises(error, match=message):
        clip(danlu.Adam)([torch.nn.Parameter(torch.zeros(2))], lr=0.1, **kwargs)


def test_groups_must_agree():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = clip(danlu.SGD)([{"params": [a]}, {"params": [b], "global_clipnorm": 2.0}], lr=0.1, global_clipnorm=1.0)
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    with pytest.raises(ValueError, match=r"global_clipnorm must be the same in every parameter group, got \[1.0, 2.0\]"):
        opt.step()
    assert torch.equal(a.detach(), torch.zeros(2))


def test_factory_names():
    params = named()
    assert "clip" in danlu.factory.DERIVATION_NAMES
    opt = danlu.create_optimizer(params, "adamw+gradient_clipping", lr=0.1, clipnorm=1.0)
    assert isinstance(opt, danlu.derive.DerivationHost)
    assert opt.param_groups[0]["clipnorm"] == 1.0
