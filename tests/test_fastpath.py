"""Every fast path equals the per-tensor reference (``foreach=False``).

float64 to 1e-12, float32 to rounding, for every base optimizer and option set, alone and under
derived stacks; parameters, every state tensor and the gradients (accumulation rewrites them) are
compared after every call. The native kernels are checked to have run where they are available.
"""

from __future__ import annotations

import copy

import pytest
import torch

import danlu
from cases import base_cases
from danlu import _fused, _native

D = danlu

OPTIMIZERS = [(case.id, case.cls, dict(case.kwargs)) for case in base_cases() if case.native]

STACKS = [
    ("skip_nonfinite_wd", [D.extend_with_weight_decay, D.extend_with_skip_nonfinite], dict(weight_decay_rate=0.1)),
    ("plain", [], {}),
    ("wd", [D.extend_with_weight_decay], dict(weight_decay_rate=0.1, exclude_from_weight_decay=["bias"])),
    (
        "lamb",
        [D.extend_with_weight_decay, D.extend_with_layer_adaptation],
        dict(weight_decay_rate=0.1, exclude_from_layer_adaptation=["norm"]),
    ),
    ("lookahead", [D.extend_with_lookahead], dict(steps_per_slow_update=2, slow_step_size=0.6)),
    ("ema", [D.extend_with_exponential_moving_average], dict(ema_momentum=0.8)),
    (
        "ema_then_lookahead",
        [D.extend_with_exponential_moving_average, D.extend_with_lookahead],
        dict(steps_per_slow_update=3, ema_momentum=0.7),
    ),
    (
        "lookahead_then_ema",
        [D.extend_with_lookahead, D.extend_with_exponential_moving_average],
        dict(steps_per_slow_update=3, ema_momentum=0.7),
    ),
    ("accum", [D.extend_with_gradient_accumulation], dict(grad_accum_steps=3)),
    (
        "accum_wd_piecewise",
        [D.extend_with_weight_decay, D.extend_with_piecewise_linear_lr, D.extend_with_gradient_accumulation],
        dict(grad_accum_steps=2, lr_schedule={2: 1.0, 5: 0.3}),
    ),
    (
        "paramwise_wd",
        [D.extend_with_parameter_wise_lr, D.extend_with_weight_decay],
        dict(paramwise_lr_schedule={"layer.1": 0.5, "w": 2.0}),
    ),
    (
        "wd_paramwise_layer",
        [D.extend_with_weight_decay, D.extend_with_layer_adaptation, D.extend_with_parameter_wise_lr],
        dict(paramwise_lr_schedule={"layer.0": 0.25}),
    ),
    (
        "lazy",
        [D.extend_with_lazy_optimization, D.extend_with_lookahead],
        dict(include_in_lazy_optimization=["emb"], steps_per_slow_update=2),
    ),
    (
        "everything",
        [
            D.extend_with_weight_decay,
            D.extend_with_piecewise_linear_lr,
            D.extend_with_gradient_accumulation,
            D.extend_with_lookahead,
            D.extend_with_exponential_moving_average,
        ],
        dict(grad_accum_steps=2, steps_per_slow_update=2, lr_schedule={0: 0.5, 4: 1.0}),
    ),
    ("schedule_free", [D.extend_with_schedule_free], dict(schedule_free_momentum=0.8, average_power=0.5)),
    (
        "lookahead_in_sf_ema",  # Lookahead fused on z inside, the EMA in Python on y outside
        [D.extend_with_lookahead, D.extend_with_schedule_free, D.extend_with_exponential_moving_average],
        dict(steps_per_slow_update=2, ema_momentum=0.7, schedule_free_momentum=0.8),
    ),
    ("ema_in_sf", [D.extend_with_exponential_moving_average, D.extend_with_schedule_free], dict(ema_momentum=0.7)),
    (
        "wd_accum_sf_piecewise",
        [
            D.extend_with_weight_decay,
            D.extend_with_gradient_accumulation,
            D.extend_with_schedule_free,
            D.extend_with_piecewise_linear_lr,
        ],
        dict(weight_decay_rate=0.1, grad_accum_steps=2, lr_schedule={0: 0.5, 4: 1.0}),
    ),
]

SHAPES = [
    ("layer.0.w", (12, 10)),  # factored, largest axis 0
    ("layer.1.w", (9, 14)),  # factored, largest axis 1
    ("layer.1.bias", (7,)),
    ("norm.weight", (5,)),
    ("conv.w", (3, 4, 9)),  # 3-D: Adafactor's generic path
    ("emb.weight", (6, 4)),
]


def _make(cls, kw, dtype, foreach, seed=0):
    torch.manual_seed(seed)
    named = [(n, torch.nn.Parameter(torch.randn(s, dtype=dtype))) for n, s in SHAPES]
    named[2][1].data.zero_()  # a bias that starts at zero
    return named, cls(named, foreach=foreach, **kw)


def _grads(named, call, dtype):
    gen = torch.Generator().manual_seed(1000 + call)
    for i, (name, p) in enumerate(named):
        if name == "norm.weight" and call % 3 == 1:
            p.grad = None  # sometimes no gradient
            continue
        g = torch.randn(p.shape, generator=gen, dtype=dtype)
        if name == "emb.weight":
            g[call % p.shape[0]] = 0  # a row with an all-zero gradient
        if call % 4 == 3 and i == 0:
            g = g * 100  # large gradients: clipping and trust ratios
        p.grad = g


def _tensors(opt):
    out = {}
    for i, state in enumerate(opt.state.values()):
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[(i, key)] = value
    return out


def _compare(a, b, dtype, where):
    if dtype == torch.float64:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=lambda m: f"{where}: {m}")
    else:
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6, msg=lambda m: f"{where}: {m}")


def _run_pair(cls, kw, dtype, calls=7, fast_foreach=None):
    named_a, fast = _make(cls, kw, dtype, fast_foreach)
    named_b, ref = _make(cls, kw, dtype, False)
    before = _fused.STATS["native_tensors"]
    for call in range(calls):
        _grads(named_a, call, dtype)
        _grads(named_b, call, dtype)
        fast.step()
        ref.step()
        for (name, pa), (_, pb) in zip(named_a, named_b):
            _compare(pa.detach(), pb.detach(), dtype, f"call {call} param {name}")
            if pa.grad is not None:
                _compare(pa.grad, pb.grad, dtype, f"call {call} grad {name}")
        sa, sb = _tensors(fast), _tensors(ref)
        assert sa.keys() == sb.keys()
        for key in sa:
            _compare(sa[key], sb[key], dtype, f"call {call} state {key}")
    return fast, _fused.STATS["native_tensors"] - before


def _stack(base, derivations):
    cls = base
    for extend in derivations:
        cls = extend(cls)
    return cls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("stack", STACKS, ids=[s[0] for s in STACKS])
@pytest.mark.parametrize("opt_case", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
def test_fast_path_equals_reference(opt_case, stack, dtype):
    _, base, base_kw = opt_case
    _, derivations, stack_kw = stack
    if base is D.Adafactor and stack[0] in ("lamb", "wd_paramwise_layer"):
        pytest.skip("layer adaptation over Adafactor: covered by the generic path")
    cls = _stack(base, derivations)
    _, native_tensors = _run_pair(cls, {**base_kw, **stack_kw}, dtype)
    if _native.available():
        assert native_tensors > 0, "the native kernels did not run"


@pytest.mark.parametrize("opt_case", OPTIMIZERS[::3], ids=[o[0] for o in OPTIMIZERS[::3]])
def test_foreach_path_equals_reference(opt_case):
    _, base, kw = opt_case
    _, native_tensors = _run_pair(
        D.extend_with_lookahead(D.extend_with_weight_decay(base)),
        dict(kw, steps_per_slow_update=2),
        torch.float64,
        fast_foreach=True,
    )
    assert native_tensors == 0


def test_native_disabled_falls_back():
    _native.disable()
    try:
        _, native_tensors = _run_pair(D.Lamb, dict(lr=0.01), torch.float64)
        assert native_tensors == 0
    finally:
        _native.enable()


@pytest.mark.skipif(not _native.available(), reason="no native kernels on this machine")
@pytest.mark.parametrize("name", ["adam", "adafactor", "lion", "sgd_nesterov"])
def test_two_threads_large_tensors(name):
    base, kw = {o[0]: (o[1], o[2]) for o in OPTIMIZERS}[name]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for extend in ([], [D.extend_with_weight_decay, D.extend_with_layer_adaptation]):
            if base is D.Adafactor and extend:
                continue
            cls = _stack(base, extend)
            torch.manual_seed(0)
            pa = torch.nn.Parameter(torch.randn(300, 400, dtype=torch.float64))
            pb = torch.nn.Parameter(pa.detach().clone())
            fast, ref = cls([pa], **kw), cls([pb], foreach=False, **kw)
            for call in range(3):
                g = torch.randn(300, 400, dtype=torch.float64)
                pa.grad, pb.grad = g.clone(), g.clone()
                fast.step()
                ref.step()
                _compare(pa.detach(), pb.detach(), torch.float64, f"{name} call {call}")
    finally:
        torch.set_num_threads(threads)


def test_non_contiguous_and_mixed_dtypes_take_the_generic_path():
    torch.manual_seed(0)
    base = torch.randn(8, 6, dtype=torch.float64)
    a = torch.nn.Parameter(base.t())  # non-contiguous
    b = torch.nn.Parameter(torch.randn(5, dtype=torch.float32))
    c = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    ra, rb, rc = (torch.nn.Parameter(x.detach().clone()) for x in (a, b, c))
    fast = D.AdamW([a, b, c], lr=0.1)
    ref = D.AdamW([ra, rb, rc], lr=0.1, foreach=False)
    for _ in range(3):
        for x, y in ((a, ra), (b, rb), (c, rc)):
            g = torch.randn(x.shape, dtype=x.dtype)
            x.grad, y.grad = g.clone(), g.clone()
        fast.step()
        ref.step()
    for x, y in ((a, ra), (b, rb), (c, rc)):
        _compare(x.detach(), y.detach(), x.dtype, "mixed")


def test_resume_is_bit_identical_on_the_fast_path():
    cls = _stack(
        D.AdamW, [D.extend_with_gradient_accumulation, D.extend_with_lookahead, D.extend_with_exponential_moving_average]
    )
    kw = dict(lr=0.01, grad_accum_steps=2, steps_per_slow_update=3)
    named_a, a = _make(cls, kw, torch.float32, None)
    for call in range(5):
        _grads(named_a, call, torch.float32)
        a.step()
    saved = copy.deepcopy(a.state_dict())
    params_saved = [p.detach().clone() for _, p in named_a]
    for call in range(5, 12):
        _grads(named_a, call, torch.float32)
        a.step()
    named_b, b = _make(cls, kw, torch.float32, None, seed=1)
    with torch.no_grad():
        for (_, p), saved_p in zip(named_b, params_saved):
            p.copy_(saved_p)
    b.load_state_dict(saved)
    for call in range(5, 12):
        _grads(named_b, call, torch.float32)
        b.step()
    for (_, pa), (_, pb) in zip(named_a, named_b):
        assert torch.equal(pa, pb)


def test_version_counter_is_bumped():
    p = torch.nn.Parameter(torch.randn(4, 4))
    p.grad = torch.randn(4, 4)
    opt = D.Adam([p], lr=0.1)
    before = p._version
    opt.step()
    assert p._version > before


def test_subclass_overriding_the_reference_keeps_the_generic_path():
    class Doubled(D.Adam):
        def _update_single(self, group, p, grad, state, lr, step):
            return super()._update_single(group, p, grad, state, lr, step) * 2

    assert _fused.spec_for(Doubled([torch.nn.Parameter(torch.zeros(2))])) is None
    assert _fused.spec_for(D.LazyAdam([torch.nn.Parameter(torch.zeros(2))])) is None
    assert _fused.spec_for(D.Lamb([torch.nn.Parameter(torch.zeros(2))])) is not None


TORCH_FUSED_STACKS = [
    s
    for s in STACKS
    if s[0]
    in (
        "plain",
        "wd",
        "lookahead",
        "ema_then_lookahead",
        "accum",
        "accum_wd_piecewise",
        "paramwise_wd",
        "lazy",
        "everything",
        "schedule_free",
        "lookahead_in_sf_ema",
        "wd_accum_sf_piecewise",
    )
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("stack", TORCH_FUSED_STACKS, ids=[s[0] for s in TORCH_FUSED_STACKS])
@pytest.mark.parametrize("opt_case", [o for o in OPTIMIZERS if o[1] is danlu.Adam], ids=lambda o: o[0])
def test_torch_fused_adam_path_equals_reference(opt_case, stack, dtype):
    """Without the native library (and on CUDA) Adam stacks run torch._fused_adamw_; same numbers."""
    _, base, base_kw = opt_case
    _, derivations, stack_kw = stack
    _native.disable()
    try:
        before = _fused.STATS["torch_fused_tensors"]
        _, native_tensors = _run_pair(_stack(base, derivations), {**base_kw, **stack_kw}, dtype)
        assert native_tensors == 0
        if stack[0] != "paramwise_wd":  # every tensor there has a parameter-wise lr: the generic path
            assert _fused.STATS["torch_fused_tensors"] > before
    finally:
        _native.enable()


class _Wrapped(torch.Tensor):
    """A tensor subclass (as DTensor is): its memory is not the native kernels' business."""


def test_tensor_subclasses_take_the_generic_path():
    torch.manual_seed(0)
    data = torch.randn(6, 4, dtype=torch.float64)
    p = torch.nn.Parameter(data.clone().as_subclass(_Wrapped))
    q = torch.nn.Parameter(data.clone())
    fast, ref = D.AdamW([p], lr=0.1), D.AdamW([q], lr=0.1, foreach=False)
    before = _fused.STATS["native_tensors"] + _fused.STATS["torch_fused_tensors"]
    for _ in range(3):
        g = torch.randn(6, 4, dtype=torch.float64)
        p.grad, q.grad = g.clone().as_subclass(_Wrapped), g.clone()
        fast.step()
        ref.step()
    assert _fused.STATS["native_tensors"] + _fused.STATS["torch_fused_tensors"] == before
    _compare(torch.Tensor(p.detach()).as_subclass(torch.Tensor), q.detach(), torch.float64, "subclass")



def _accum_pair(dtypes, grads_for_call):
    """A natively run and a reference AdamW under accumulation (k=2), one group, compared after every call."""
    cls = D.extend_with_gradient_accumulation(D.AdamW)
    torch.manual_seed(0)
    fast_params = [torch.nn.Parameter(torch.randn(6, 5, dtype=dtype)) for dtype in dtypes]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in fast_params]
    fast, ref = cls(fast_params, lr=0.1, grad_accum_steps=2), cls(ref_params, lr=0.1, grad_accum_steps=2, foreach=False)
    for call in range(6):
        for ps in (fast_params, ref_params):
            for p, g in zip(ps, grads_for_call(call)):
                p.grad = g.to(p.dtype)
        fast.step()
        ref.step()
        for pa, pb in zip(fast_params, ref_params):
            _compare(pa.detach(), pb.detach(), pa.dtype, f"call {call}")
            _compare(fast.state[pa]["accum.grad"], ref.state[pb]["accum.grad"], pa.dtype, f"call {call} buffer")
    return fast, fast_params


def _two_grads(call):
    gen = torch.Generator().manual_seed(call)
    return [torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)]


@pytest.mark.skipif(not _native.available(), reason="no native kernels on this machine")
def test_a_deferred_mean_taken_by_the_generic_path_clears_its_buffer():
    """Both means are left to the kernel; the float64 tensor of a float32 group then takes the generic path."""
    before = _fused.STATS["native_tensors"]
    fast, params = _accum_pair([torch.float32, torch.float64], _two_grads)
    assert _fused.STATS["native_tensors"] == before + 3  # the float32 tensor, on each applying call
    for p in params:
        assert torch.count_nonzero(fast.state[p]["accum.grad"]) == 0


@pytest.mark.skipif(not _native.available(), reason="no native kernels on this machine")
def test_a_natively_accumulated_step_runs_no_torch_op_on_the_buffers():
    """The kernel forms the mean and clears the buffer in its pass: no second pass over the buffers."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    fast, params = _accum_pair([torch.float32, torch.float32], _two_grads)
    buffers = {fast.state[p]["accum.grad"].untyped_storage().data_ptr() for p in params}
    touched: list[str] = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            for t in tree_flatten((args, kwargs or {}))[0]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in buffers:
                    touched.append(str(func))
            return func(*args, **(kwargs or {}))

    for call in range(6, 8):
        for p, g in zip(params, _two_grads(call)):
            p.grad = g
        before = _fused.STATS["native_tensors"]
        with Spy():
            fast.step()
        if call % 2:  # the applying call
            assert _fused.STATS["native_tensors"] == before + 2
            assert touched == []
        else:  # the buffering call: one foreach add, which reads each buffer once
            assert touched == ["aten._foreach_add_.List"] * 2
        touched.clear()
    for p in params:
        assert torch.count_nonzero(fast.state[p]["accum.grad"]) == 0
