"""extend_with_gradient_clipping: Keras' formulas, the accumulation order, grad_norm, .grad untouched, bad input."""

from __future__ import annotations

import io
import math

import pytest
import torch

import danlu
from danlu import _native
from danlu import extend_with_gradient_accumulation as accum
from danlu import extend_with_gradient_clipping as clip
from danlu.derivations import gradient_clipping as clipping

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


# ------------------------------------------------------------------ the native norm pass

native_only = pytest.mark.skipif(not _native.available(), reason="no native kernels on this machine")

# every remainder of the 64-lane loop, and the chunk boundary (32768) of the threaded split
SIZES = [(0,), (1,), (7,), (63,), (64,), (65,), (33, 65), (32767,), (32768,), (32769,), (3, 33335)]


def _odd_tensors(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype) for s in SIZES]


def _native_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    norms = clipping._native_norms(grads, [{"foreach": None}])
    assert norms is not None
    return norms


@native_only
def test_native_norms_of_float64_equal_torch():
    grads = _odd_tensors(torch.float64)
    norms = _native_norms(grads)
    assert norms.dtype == torch.float64
    torch.testing.assert_close(norms, torch.stack(torch._foreach_norm(grads)), rtol=1e-14, atol=0)
    assert norms[0].item() == 0.0  # the empty tensor


@native_only
def test_native_norms_of_float32_are_the_double_norm_rounded_once():
    """The squares of floats are exact in double: the sum is exact to double rounding, the root rounded to float32 once.

    torch's own float32 norm accumulates in float32; it agrees to a few float32 ulps (1e-6 relative).
    """
    grads = _odd_tensors(torch.float32)
    norms = _native_norms(grads)
    assert norms.dtype == torch.float32
    exact = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads]).float()
    assert torch.equal(norms, exact)
    torch.testing.assert_close(norms, torch.stack(torch._foreach_norm(grads)), rtol=1e-6, atol=0)


@native_only
def test_native_norms_of_bfloat16_round_to_bfloat16_as_torch_does():
    grads = _odd_tensors(torch.bfloat16)
    norms = _native_norms(grads)
    assert norms.dtype == torch.float32
    exact = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])
    assert torch.equal(norms, exact.to(torch.bfloat16).float())
    ours = torch.stack(torch._foreach_norm(grads)).float()  # rounded to bfloat16 from a float32 sum: 1 ulp (2**-8) apart at most
    torch.testing.assert_close(norms, ours, rtol=2**-8, atol=0)


@native_only
def test_native_norms_of_mixed_dtypes_round_each_to_its_own():
    grads = [*_odd_tensors(torch.float32)[4:7], *_odd_tensors(torch.bfloat16, seed=1)[4:7], *_odd_tensors(torch.float64, seed=2)[4:7]]
    norms = _native_norms(grads)
    assert norms.dtype == torch.float64
    exact = [torch.linalg.vector_norm(g.double()) for g in grads]
    expected = torch.stack([e.to(g.dtype).double() for e, g in zip(exact, grads)])
    assert torch.equal(norms[:6], expected[:6])
    torch.testing.assert_close(norms[6:], expected[6:], rtol=1e-14, atol=0)


@native_only
def test_native_norms_are_the_same_bits_for_any_thread_count():
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(5 * 32768 + 11, generator=gen), torch.randn(70000, generator=gen), torch.randn(3, generator=gen)]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _native_norms(grads)
        torch.set_num_threads(2)
        two = _native_norms(grads)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


@native_only
@pytest.mark.parametrize(
    "grads",
    [
        lambda: [torch.randn(4, 4).t()],  # not contiguous
        lambda: [torch.randn(4, dtype=torch.float16)],
        lambda: [torch.randn(4, dtype=torch.complex64)],
        lambda: [torch.randn(4), torch.randn(3, dtype=torch.float16)],
    ],
    ids=["non-contiguous", "float16", "complex", "one-float16"],
)
def test_native_norms_leave_what_they_cannot_read_to_torch(grads):
    assert clipping._native_norms(grads(), [{"foreach": None}]) is None


@pytest.mark.parametrize("foreach", [False, True])
def test_native_norms_leave_a_group_with_foreach_set_to_torch(foreach):
    assert clipping._native_norms([torch.randn(4)], [{"foreach": None}, {"foreach": foreach}]) is None


def _spy_native_sums(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    lib = _native.load()
    assert lib is not None
    calls: list[int] = []
    kernel = lib.danlu_sum_squares

    def counted(n, *args):
        calls.append(n)
        return kernel(n, *args)

    monkeypatch.setattr(lib, "danlu_sum_squares", counted)
    return calls


@native_only
@pytest.mark.parametrize("option", ["global_clipnorm", "clipnorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_clipping_takes_the_native_norms_and_matches_the_torch_path(monkeypatch, option, dtype):
    sequence = [[g.to(dtype) for g in gs] for gs in grad_sequence(4)]
    fast = [torch.nn.Parameter(p.detach().to(dtype)) for _, p in named()]
    slow = [torch.nn.Parameter(p.detach().to(dtype)) for _, p in named()]
    opt_fast = clip(danlu.AdamW)(fast, lr=0.01, **{option: 1.0})
    opt_slow = clip(danlu.AdamW)(slow, lr=0.01, **{option: 1.0})
    calls = _spy_native_sums(monkeypatch)
    norms_fast, norms_slow = [], []
    for grads in sequence:
        run(opt_fast, fast, [grads])
        norms_fast.append(opt_fast.grad_norm)
        _native.disable()
        try:
            run(opt_slow, slow, [grads])
        finally:
            _native.enable()
        norms_slow.append(opt_slow.grad_norm)
    assert calls == [len(SHAPES)] * len(sequence)  # the native pass ran at every step, over every gradient
    tol = dict(rtol=1e-14, atol=0) if dtype == torch.float64 else dict(rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.stack(norms_fast), torch.stack(norms_slow), **tol)
    for p, q in zip(fast, slow):
        torch.testing.assert_close(p, q, rtol=1e-13 if dtype == torch.float64 else 2e-6, atol=1e-14 if dtype == torch.float64 else 2e-7)


@native_only
def test_clipping_with_foreach_false_keeps_the_torch_norms(monkeypatch):
    calls = _spy_native_sums(monkeypatch)
    params = [p for _, p in named()]
    run(clip(danlu.AdamW)(params, lr=0.01, global_clipnorm=1.0, foreach=False), params, grad_sequence(2))
    assert calls == []


def test_grad_norm_is_the_same_bits_in_any_parameter_order():
    sequence = [[g.float() for g in gs] for gs in grad_sequence(3)]
    forward = [torch.nn.Parameter(p.detach().float()) for _, p in named()]
    backward = [torch.nn.Parameter(p.detach().float()) for _, p in named()][::-1]
    opt_a = clip(danlu.AdamW)(forward, lr=0.01, global_clipnorm=1.0)
    opt_b = clip(danlu.AdamW)(backward, lr=0.01, global_clipnorm=1.0)
    for grads in sequence:
        run(opt_a, forward, [grads])
        run(opt_b, backward, [grads[::-1]])
        assert torch.equal(opt_a.grad_norm, opt_b.grad_norm)
    for p, q in zip(forward, backward[::-1]):
        assert torch.equal(p, q)


def test_element_codes_agree_with_the_kernels():
    import re
    from pathlib import Path

    source = (Path(danlu.__file__).parent / "_kernels.cpp").read_text()
    body = re.search(r"enum class Elem : int \{([^}]*)\}", source)
    assert body is not None
    codes = {k.strip(): int(v) for k, v in (m.split("=") for m in body.group(1).split(","))}
    names = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16"}
    assert {names[dtype]: code for dtype, code in clipping._NATIVE_DTYPES.items()} == codes
