"""Regression tests for torch.optim conventions that danlu once broke (API.md section 8).

Step hooks once per step, complex parameters, LazyAdam's sparse and channels_last gradients,
pickling of classes and whole optimizers, and the factory's message for a torch argument name.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import danlu

# ---------------------------------------------------------------------------------------------- hooks


def _hook_log(opt: torch.optim.Optimizer, w: torch.Tensor) -> list[Any]:
    log: list[Any] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: log.append(("pre", w.detach().clone())))
    opt.register_step_post_hook(lambda o, args, kwargs: log.append(("post", w.detach().clone())))
    return log


@pytest.mark.parametrize("base", [torch.optim.SGD, danlu.SGD], ids=["torch.optim.SGD", "danlu.SGD"])
def test_step_hooks_run_once_after_the_derivations(base: type) -> None:
    w = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    base([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # a plain instance: torch hooks the base class's step
    derived = danlu.extend_with_lookahead(danlu.extend_with_weight_decay(base))
    opt = derived([w], lr=0.1, weight_decay_rate=0.5, steps_per_slow_update=1, slow_step_size=0.5)
    log = _hook_log(opt, w)
    w.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    # SGD and decay: 1 - 0.1 - 0.05 = 0.85; Lookahead with alpha 0.5 over slow weights 1: 0.925
    assert [kind for kind, _ in log] == ["pre", "post"]
    assert torch.equal(log[0][1], torch.ones(2, dtype=torch.float64))
    assert torch.equal(log[1][1], torch.full((2,), 0.925, dtype=torch.float64))


def test_issue_example_weight_decay_over_torch_sgd_calls_the_hook_once() -> None:
    w = torch.nn.Parameter(torch.ones(1))
    torch.optim.SGD([w])
    opt = danlu.extend_with_weight_decay(torch.optim.SGD)([w], lr=0.1)
    calls: list[int] = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(1))
    w.grad = torch.ones(1)
    opt.step()
    assert calls == [1]


def test_global_step_hooks_run_once_for_a_derived_torch_base() -> None:
    w = torch.nn.Parameter(torch.ones(1))
    torch.optim.Adam([w])
    opt = danlu.extend_with_exponential_moving_average(torch.optim.Adam)([w], lr=0.1)
    seen: list[str] = []
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: seen.append("pre") if o is opt else None),
        register_optimizer_step_post_hook(lambda o, a, k: seen.append("post") if o is opt else None),
    ]
    try:
        w.grad = torch.ones(1)
        opt.step()
    finally:
        for handle in handles:
            handle.remove()
    assert seen == ["pre", "post"]


def test_a_pre_hook_can_replace_the_closure_of_a_derived_step() -> None:
    w = torch.nn.Parameter(torch.ones(1))
    torch.optim.SGD([w])
    opt = danlu.extend_with_lookahead(torch.optim.SGD)([w], lr=0.1)
    opt.register_step_pre_hook(lambda o, args, kwargs: ((args[0],), {"closure": lambda: 42.0}))
    w.grad = torch.ones(1)
    assert opt.step() == 42.0


def test_the_derived_class_step_is_torch_hooked_and_profiled_under_its_own_name() -> None:
    cls = danlu.extend_with_lookahead(torch.optim.SGD, name="ProfiledSGD")
    w = torch.nn.Parameter(torch.ones(1))
    opt = cls([w], lr=0.1)
    assert getattr(cls.step, "hooked", False)
    w.grad = torch.ones(1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.step()
    names = [e.name for e in prof.events() if e.name.startswith("Optimizer.step#")]
    assert names == ["Optimizer.step#ProfiledSGD.step"]


# -------------------------------------------------------------------------------------------- factory

ADAMW_KEYWORDS = (
    "lr, betas, eps, bias_correction, foreach, state_dtype, stochastic_rounding, weight_decay_rate, exclude_from_weight_decay"
)


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        (
            "adamw",
            {"weight_decay": 0.01},
            "create_optimizer('adamw'): unexpected keyword argument 'weight_decay'; danlu's decoupled weight decay is "
            f"'weight_decay_rate'. Valid keyword arguments for 'adamw': {ADAMW_KEYWORDS}",
        ),
        (
            "adam",
            {"weight_decay": 0.01},
            "create_optimizer('adam'): unexpected keyword argument 'weight_decay'; 'adam' has no weight decay: use 'adamw' "
            "or add '+weight_decay', then pass weight_decay_rate. Valid keyword arguments for 'adam': "
            "lr, betas, eps, bias_correction, foreach, state_dtype, stochastic_rounding",
        ),
        (
            "adam+lookahead",
            {"lr": 0.1, "k": 5},
            "create_optimizer('adam+lookahead'): unexpected keyword argument 'k'; danlu calls it 'steps_per_slow_update'. "
            "Valid keyword arguments for 'adam+lookahead': lr, betas, eps, bias_correction, foreach, state_dtype, "
            "stochastic_rounding, steps_per_slow_update, slow_step_size",
        ),
        (
            "adam",
            {"ema_momentum": 0.9},
            "create_optimizer('adam'): unexpected keyword argument 'ema_momentum'; it belongs to the 'ema' derivation: "
            "add '+ema' to the spec. Valid keyword arguments for 'adam': "
            "lr, betas, eps, bias_correction, foreach, state_dtype, stochastic_rounding",
        ),
        (
            "torch.SGD",
            {"lr": 0.1, "weight_decay_rate": 0.1},
            "create_optimizer('torch.SGD'): unexpected keyword argument 'weight_decay_rate'; 'torch.SGD' takes torch's "
            "'weight_decay' (add '+weight_decay' for danlu's decoupled decay). Valid keyword arguments for 'torch.SGD': "
            + ", ".join(list(inspect.signature(torch.optim.SGD).parameters)[1:]),  # torch's own list, version-dependent
        ),
    ],
)
def test_an_unknown_keyword_names_the_spec_and_the_valid_keywords(spec: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError) as info:
        danlu.create_optimizer(torch.nn.Linear(2, 2), spec, **kwargs)
    assert str(info.value) == message


# ------------------------------------------------------------------------------------------- pickling


@pytest.mark.parametrize("cls", [danlu.AdamW, danlu.Lamb, danlu.Ranger, danlu.LazyAdam, danlu.Adam])
def test_ready_made_classes_pickle_by_reference(cls: type) -> None:
    assert pickle.loads(pickle.dumps(cls)) is cls


def test_a_derived_class_bound_to_its_name_in_its_module_pickles_by_reference() -> None:
    assert DerivedAtModuleLevel.__module__ == __name__
    assert pickle.loads(pickle.dumps(DerivedAtModuleLevel)) is DerivedAtModuleLevel


DerivedAtModuleLevel = danlu.extend_with_lookahead(torch.optim.SGD, name="DerivedAtModuleLevel")

STACKS: dict[str, Any] = {
    "danlu.Lamb": lambda model: danlu.Lamb(model.named_parameters(), lr=0.01),
    "adamw+lookahead+ema (factory)": lambda model: danlu.create_optimizer(
        model, "adamw+lookahead+ema", lr=0.01, steps_per_slow_update=2, ema_momentum=0.5
    ),
    "torch.optim.AdamW+lookahead": lambda model: danlu.extend_with_lookahead(torch.optim.AdamW)(
        model.parameters(), lr=0.01, steps_per_slow_update=2
    ),
    "torch.optim.SGD+weight_decay+gradient_accumulation+ema": lambda model: danlu.extend_with_exponential_moving_average(
        danlu.extend_with_gradient_accumulation(danlu.extend_with_weight_decay(torch.optim.SGD), name="Named")
    )(model.parameters(), lr=0.1, momentum=0.9, grad_accum_steps=2, ema_momentum=0.9),
    "danlu.AdamW+piecewise_linear_lr": lambda model: danlu.extend_with_piecewise_linear_lr(danlu.AdamW)(
        model.parameters(), lr=0.01, lr_schedule={2: 1.0, 5: 0.5}
    ),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x = torch.linspace(-1, 1, 6 * 3, dtype=torch.float64).reshape(6, 3) * (1 + step)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("stack", list(STACKS))
def test_a_saved_derived_optimizer_continues_bit_identically(stack: str) -> None:
    model = _model()
    opt = STACKS[stack](model)
    _train(model, opt, range(3))
    buffer = io.BytesIO()
    torch.save({"model": model, "optimizer": opt}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    copied = copy.deepcopy({"model": model, "optimizer": opt})
    assert type(copied["optimizer"]) is type(opt)
    assert type(loaded["optimizer"]).__name__ == type(opt).__name__
    assert [type(d) for d in type(loaded["optimizer"])._danlu_derivations] == [type(d) for d in type(opt)._danlu_derivations]
    _train(model, opt, range(3, 7))
    for twin in (loaded, copied):
        _train(twin["model"], twin["optimizer"], range(3, 7))
        assert all(torch.equal(a, b) for a, b in zip(_params(model), _params(twin["model"])))
        assert twin["optimizer"].param_groups[0]["applied_steps"] == opt.param_groups[0]["applied_steps"]


def test_a_derived_optimizer_loads_in_a_fresh_process(tmp_path: Any) -> None:
    model = _model()
    opt = STACKS["torch.optim.SGD+weight_decay+gradient_accumulation+ema"](model)
    _train(model, opt, range(3))
    torch.save({"model": model, "optimizer": opt}, tmp_path / "whole.pt")
    _train(model, opt, range(3, 7))
    torch.save(_params(model), tmp_path / "expected.pt")
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_torch_contract_defects import _params, _train
whole = torch.load({str(tmp_path / "whole.pt")!r}, weights_only=False)
assert type(whole["optimizer"]).__name__ == "NamedWithExponentialMovingAverage", type(whole["optimizer"])
_train(whole["model"], whole["optimizer"], range(3, 7))
expected = torch.load({str(tmp_path / "expected.pt")!r})
assert all(torch.equal(a, b) for a, b in zip(expected, _params(whole["model"])))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------------------------------- LazyAdam


def _lazy_run(shape: tuple[int, ...], grads: list[torch.Tensor], dense: bool, memory_format: Any = None) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(*shape, dtype=torch.float64))
    if memory_format is not None:
        w = torch.nn.Parameter(w.detach().to(memory_format=memory_format))
    opt = danlu.LazyAdam([w], lr=0.1, eps=1e-8)
    for grad in grads:
        grad = grad.to_dense() if dense and grad.is_sparse else grad
        w.grad = grad.to(memory_format=memory_format) if memory_format is not None else grad
        opt.step()
    return w.detach()


def _gather_grad(shape: tuple[int, int], index: list[list[int]], scale: float) -> torch.Tensor:
    w = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    picked = torch.gather(w, 1, torch.tensor(index), sparse_grad=True)
    (picked * torch.arange(1.0, picked.numel() + 1, dtype=torch.float64).reshape(picked.shape) * scale).sum().backward()
    assert w.grad is not None and w.grad.is_sparse and w.grad.sparse_dim() == 2
    return w.grad


@pytest.mark.parametrize(
    "indices",
    [
        [[[0, 2], [1, 1], [2, 0], [0, 0]]] * 3,  # duplicates within a row
        [[[2], [0], [1], [1]], [[0, 1, 2], [0, 1, 2], [2, 2, 2], [1, 0, 2]], [[1], [1], [1], [1]]],  # other numbers of non-zeros
    ],
    ids=["same-pattern", "changing-nnz"],
)
def test_lazy_adam_element_sparse_gradient_acts_as_its_dense_equivalent(indices: list[list[list[int]]]) -> None:
    grads = [_gather_grad((4, 3), index, 1.0 + step) for step, index in enumerate(indices)]
    sparse, dense = _lazy_run((4, 3), grads, dense=False), _lazy_run((4, 3), grads, dense=True)
    assert torch.equal(sparse, dense)


def test_lazy_adam_element_sparse_gradient_leaves_untouched_rows() -> None:
    grads = [_coo([[0, 1, 1], [0, 2, 2]], [1.0, 2.0, 0.5], (4, 3))]  # element-sparse, rows 0 and 1 only
    torch.manual_seed(0)
    before = torch.randn(4, 3, dtype=torch.float64)
    after = _lazy_run((4, 3), grads, dense=False)
    assert torch.equal(after[2:], before[2:]) and not torch.equal(after[:2], before[:2])


def _coo(indices: list[list[int]], values: list[Any], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor(indices), torch.tensor(values, dtype=torch.float64), shape)


def _ones(*shape: int) -> torch.Tensor:
    """A sparse gradient of ones whose only sparse dimension is the first."""
    return torch.ones(*shape, dtype=torch.float64).to_sparse(1)


@pytest.mark.parametrize(
    ("shape", "grads"),
    [
        ((5,), [_coo([[0, 3, 3]], [1.0, 2.0, -0.5], (5,)), _coo([[4]], [0.25], (5,))]),  # 1-D, uncoalesced
        ((5, 2), [_coo([[1, 3, 1]], [[1.0, 2.0], [0.5, 0.0], [-1.0, 1.0]], (5, 2)), _coo([[4, 0]], [[1.0, 1.0], [2.0, 0.0]], (5, 2))]),
        ((5, 2), [_ones(5, 2), _coo([[1, 1, 2]], [[1.0, 2.0], [-1.0, -2.0], [3.0, 0.0]], (5, 2))]),  # row 1 sums to 0
        ((3, 2, 2), [_coo([[0, 2, 0], [1, 0, 1]], [[1.0, 2.0], [3.0, 4.0], [0.5, 0.5]], (3, 2, 2))]),  # rows of a 3-D tensor
        ((3, 2, 2), [_ones(3, 2, 2), _coo([[2, 0]], [[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]], (3, 2, 2))]),
    ],
    ids=["1-D", "embedding-rows", "zero-row", "3-D-rows", "3-D-sparse-dim-1"],
)
def test_lazy_adam_sparse_gradient_acts_as_its_dense_equivalent(shape: tuple[int, ...], grads: list[torch.Tensor]) -> None:
    assert torch.equal(_lazy_run(shape, grads, dense=False), _lazy_run(shape, grads, dense=True))


def test_lazy_adam_embedding_sparse_equals_dense_embedding() -> None:
    results = []
    for sparse in (True, False):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(6, 3, sparse=sparse).double()
        opt = danlu.LazyAdam(emb.parameters(), lr=0.1)
        for ids in ([1, 4, 1], [0, 1], [5, 5, 5]):
            opt.zero_grad()
            emb(torch.tensor(ids)).pow(2).sum().backward()
            opt.step()
        results.append(emb.weight.detach())
    assert torch.equal(results[0], results[1])


def test_lazy_adam_channels_last_parameter_equals_contiguous() -> None:
    torch.manual_seed(1)
    grads = []
    for _ in range(3):
        g = torch.randn(4, 3, 2, 2, dtype=torch.float64)
        g[1] = 0
        g[2, :, 0] = 0  # rows are the last axis: some rows of a kernel are absent
        grads.append(g)
    cl = _lazy_run((4, 3, 2, 2), grads, dense=True, memory_format=torch.channels_last)
    plain = _lazy_run((4, 3, 2, 2), grads, dense=True)
    assert torch.equal(cl, plain)


def test_lazy_adam_trains_a_channels_last_conv_model() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(), torch.nn.Conv2d(3, 1, 2)).double()
    model = model.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous()
    twins = [torch.nn.Parameter(p.detach().contiguous()) for p in model.parameters()]
    opt, twin_opt = danlu.LazyAdam(model.parameters(), lr=0.01), danlu.LazyAdam(twins, lr=0.01)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64).to(memory_format=torch.channels_last)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        for p, twin in zip(model.parameters(), twins):
            assert p.grad is not None
            twin.grad = p.grad.contiguous()
        opt.step()
        twin_opt.step()
    assert all(torch.equal(p.detach(), twin.detach()) for p, twin in zip(model.parameters(), twins))


# -------------------------------------------------------------------------------------------- complex

COMPLEX_CASES: dict[str, tuple[type, type, dict[str, Any], dict[str, Any]]] = {
    # name: (danlu class, torch.optim class, danlu keywords, torch keywords)
    "Adam": (danlu.Adam, torch.optim.Adam, dict(lr=0.1, eps=1e-8), dict(lr=0.1, eps=1e-8)),
    "AdamW": (danlu.AdamW, torch.optim.AdamW, dict(lr=0.1, eps=1e-8, weight_decay_rate=0.1), dict(lr=0.1, weight_decay=0.1)),
    "LazyAdam": (danlu.LazyAdam, torch.optim.Adam, dict(lr=0.1, eps=1e-8), dict(lr=0.1, eps=1e-8)),
    "NAdam": (danlu.NAdam, torch.optim.NAdam, dict(lr=0.1), dict(lr=0.1)),
    "RAdam": (danlu.RAdam, torch.optim.RAdam, dict(lr=0.1), dict(lr=0.1)),
    "RMSprop": (danlu.RMSprop, torch.optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True), dict(lr=0.01, momentum=0.5, centered=True)),
    "Adagrad": (danlu.Adagrad, torch.optim.Adagrad, dict(lr=0.1, initial_accumulator_value=0.1), dict(lr=0.1, initial_accumulator_value=0.1)),
    "Adadelta": (danlu.Adadelta, torch.optim.Adadelta, dict(lr=1.0), dict(lr=1.0)),
    "SGD": (danlu.SGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True), dict(lr=0.1, momentum=0.9, nesterov=True)),
}


def _complex_run(cls: type, kwargs: dict[str, Any], real_pairs: bool = False, steps: int = 5) -> torch.Tensor:
    """Train a complex (3, 2) parameter, or the real (3, 4) tensor of its (real, imag) pairs, on fixed gradients."""
    torch.manual_seed(0)
    z = torch.randn(3, 2, dtype=torch.complex128)
    grads = [torch.randn(3, 2, dtype=torch.complex128) for _ in range(steps)]
    if steps > 1:
        grads[1][1] = 0  # a row without gradient (LazyAdam leaves it)
    as_param = (lambda t: torch.view_as_real(t).flatten(-2)) if real_pairs else (lambda t: t)
    w = torch.nn.Parameter(as_param(z).clone())
    opt = cls([w], **kwargs)
    for grad in grads:
        w.grad = as_param(grad).clone()
        opt.step()
    return torch.view_as_complex(w.detach().unflatten(-1, (-1, 2))) if real_pairs else w.detach()


@pytest.fixture
def float64_default() -> Any:
    """torch.optim keeps scalar state (NAdam's mu_product, step counters) in the default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("name", list(COMPLEX_CASES))
def test_complex_parameter_follows_torch_optim(name: str, float64_default: Any) -> None:
    ours, theirs, our_kwargs, their_kwargs = COMPLEX_CASES[name]
    if name == "LazyAdam":  # torch's Adam has no lazy rows: compare where every row has a gradient
        got = _complex_run(ours, our_kwargs, steps=1)
        want = _complex_run(theirs, their_kwargs, steps=1)
    else:
        got, want = _complex_run(ours, our_kwargs), _complex_run(theirs, their_kwargs)
    assert got.dtype is torch.complex128
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_the_issue_example_moves_the_imaginary_part() -> None:
    results = []
    for cls in (danlu.Adam, torch.optim.Adam):
        z = torch.nn.Parameter(torch.tensor([1 + 1j], dtype=torch.complex128))
        z.grad = torch.tensor([1j], dtype=torch.complex128)
        cls([z], lr=0.1, eps=1e-6).step()
        results.append(z.detach())
    assert results[0].real.item() == 1.0
    assert results[0].imag.item() == pytest.approx(0.9, abs=1e-6)
    torch.testing.assert_close(results[0], results[1], rtol=1e-15, atol=0)


DERIVED_COMPLEX: dict[str, tuple[type, dict[str, Any]]] = {
    **{name: (case[0], case[2]) for name, case in COMPLEX_CASES.items()},
    "Lion": (danlu.Lion, dict(lr=0.01)),
    "Lamb": (danlu.Lamb, dict(lr=0.01, weight_decay_rate=0.1)),
    "Adam+lazy+paramwise+ema+lookahead": (
        danlu.extend_with_lookahead(
            danlu.extend_with_exponential_moving_average(
                danlu.extend_with_parameter_wise_lr(danlu.extend_with_lazy_optimization(danlu.Adam))
            )
        ),
        dict(lr=0.1, steps_per_slow_update=2, ema_momentum=0.5),
    ),
    "RMSprop+accumulation+warmup+skip": (
        danlu.extend_with_skip_nonfinite(
            danlu.extend_with_piecewise_linear_lr(danlu.extend_with_gradient_accumulation(danlu.RMSprop))
        ),
        dict(lr=0.01, grad_accum_steps=2, lr_schedule={3: 1.0}),
    ),
}


@pytest.mark.parametrize("name", list(DERIVED_COMPLEX))
@pytest.mark.parametrize("foreach", [False, None], ids=["per-tensor", "default"])
def test_complex_parameter_equals_its_real_pairs(name: str, foreach: bool | None) -> None:
    cls, kwargs = DERIVED_COMPLEX[name]
    kwargs = {**kwargs, "foreach": foreach}
    got, want = _complex_run(cls, kwargs), _complex_run(cls, kwargs, real_pairs=True)
    if foreach is False:  # the same torch operations on the same numbers
        assert torch.equal(got, want)
    else:  # the real pairs may take the native kernels
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("base", [torch.optim.Adam, danlu.Adam], ids=["torch.optim.Adam", "danlu.Adam"])
def test_weight_decay_over_a_complex_parameter_is_torch_adamw(base: type, float64_default: Any) -> None:
    got = _complex_run(danlu.extend_with_weight_decay(base), dict(lr=0.1, eps=1e-8, weight_decay_rate=0.1))
    want = _complex_run(torch.optim.AdamW, dict(lr=0.1, eps=1e-8, weight_decay=0.1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_lazy_adam_leaves_a_complex_row_without_gradient() -> None:
    z = torch.nn.Parameter(torch.ones(3, 2, dtype=torch.complex128))
    opt = danlu.LazyAdam([z], lr=0.1)
    z.grad = torch.full((3, 2), 1j, dtype=torch.complex128)
    opt.step()
    first = z.detach().clone()
    z.grad = torch.zeros(3, 2, dtype=torch.complex128)
    z.grad[0, 1] = 1j  # row 0 is present: z[0, 0] moves on its momentum; rows 1 and 2 stay
    opt.step()
    assert torch.equal(z.detach()[1:], first[1:])
    assert (z.detach()[0] != first[0]).all()


@pytest.mark.parametrize(
    "cls", [danlu.Adafactor, danlu.extend_with_lookahead(danlu.Adafactor)], ids=["Adafactor", "Adafactor+lookahead"]
)
def test_an_optimizer_without_complex_support_names_the_parameter(cls: type) -> None:
    w = torch.nn.Parameter(torch.ones(2))
    z = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
    opt = cls([("w", w), ("encoder.z", z)], lr=0.1)
    w.grad, z.grad = torch.ones(2), torch.ones(2, dtype=torch.complex64)
    with pytest.raises(ValueError) as info:
        opt.step()
    assert str(info.value) == (
        f"{cls.__name__} does not support complex parameters (parameter 'encoder.z', torch.complex64): "
        "pass torch.view_as_real(p) as a real parameter, or use an optimizer that takes complex ones"
    )
    assert torch.equal(w.detach(), torch.ones(2)) and not opt.state and opt.param_groups[0].get("applied_steps", 0) == 0
    unnamed = cls([z], lr=0.1)
    with pytest.raises(ValueError, match=r"\(parameter 0 of param group 0, torch.complex64\)"):
        unnamed.step()


def test_complex_state_survives_a_state_dict_round_trip_bit_identically() -> None:
    cls = danlu.extend_with_exponential_moving_average(danlu.extend_with_lookahead(danlu.AdamW))
    kwargs = dict(lr=0.1, steps_per_slow_update=2, ema_momentum=0.5)
    torch.manual_seed(0)
    grads = [torch.randn(3, 2, dtype=torch.complex64) for _ in range(6)]
    z = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    opt = cls([z], **kwargs)
    for grad in grads[:3]:
        z.grad = grad.clone()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert all(v.dtype is torch.complex64 for k, v in saved["state"][0].items() if k != "step")
    twin = torch.nn.Parameter(z.detach().clone())
    resumed = cls([twin], **kwargs)
    resumed.load_state_dict(saved)
    for grad in grads[3:]:
        z.grad, twin.grad = grad.clone(), grad.clone()
        opt.step()
        resumed.step()
    assert torch.equal(z.detach(), twin.detach())
    with opt.ema_weights(), resumed.ema_weights():
        assert torch.equal(z.detach(), twin.detach())


def test_layer_adaptation_over_a_torch_base_takes_complex_parameters() -> None:
    cls = danlu.extend_with_layer_adaptation(danlu.extend_with_weight_decay(torch.optim.Adam))
    kwargs = dict(lr=0.1, weight_decay_rate=0.1)
    got, want = _complex_run(cls, kwargs), _complex_run(cls, kwargs, real_pairs=True)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------------- torch-style groups


def _torch_style_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    return [{"params": [model[0].weight], "weight_decay": 0.1}, {"params": [model[0].bias], "weight_decay": 0.0}]


def test_torch_style_weight_decay_groups_decay_as_torch_adamw(float64_default: Any) -> None:
    results = []
    for cls, kwargs in ((danlu.AdamW, dict(eps=1e-8)), (torch.optim.AdamW, {})):
        model = _model()
        opt = cls(_torch_style_groups(model), lr=0.01, **kwargs)
        extra = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
        opt.add_param_group({"params": [extra], "weight_decay": 0.5})
        extra.grad = torch.zeros(2, dtype=torch.float64)
        _train(model, opt, range(3))
        results.append([*_params(model)[:2], extra.detach()])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_a_group_with_both_decay_keys_is_refused() -> None:
    model = _model()
    groups = [{"params": [model[0].weight], "weight_decay": 0.1, "weight_decay_rate": 0.2}]
    with pytest.raises(ValueError) as info:
        danlu.AdamW(groups, lr=0.01)
    assert str(info.value) == (
        "param group 0 sets both weight_decay=0.1 (torch's name) and weight_decay_rate=0.2: give one of them"
    )


def test_a_torch_base_keeps_its_own_weight_decay_and_warns_of_double_decay() -> None:
    model = _model()
    with pytest.warns(UserWarning, match="decayed twice"):
        opt = danlu.extend_with_weight_decay(torch.optim.Adam)(_torch_style_groups(model), lr=0.01)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


@pytest.mark.parametrize("cls", [danlu.Adam, danlu.AdamW, danlu.Lion], ids=["Adam", "AdamW", "Lion"])
def test_complex_parameter_equals_torch_view_as_real_pairs(cls: type) -> None:
    torch.manual_seed(0)
    z0 = torch.randn(3, 2, dtype=torch.complex128)
    grads = [torch.randn(3, 2, dtype=torch.complex128) for _ in range(4)]
    z, pairs = torch.nn.Parameter(z0.clone()), torch.nn.Parameter(torch.view_as_real(z0).clone())
    opt, pair_opt = cls([z], lr=0.1, foreach=False), cls([pairs], lr=0.1, foreach=False)
    for grad in grads:
        z.grad, pairs.grad = grad.clone(), torch.view_as_real(grad).clone()
        opt.step()
        pair_opt.step()
    assert torch.equal(torch.view_as_real(z.detach()), pairs.detach())
    assert torch.equal(torch.view_as_real(opt.state[z]["exp_avg"]), pair_opt.state[pairs]["exp_avg"])


@pytest.mark.parametrize("mode", [dict(global_clipnorm=0.5), dict(clipnorm=0.5), dict(clipvalue=0.3)], ids=str)
@pytest.mark.parametrize("base", [danlu.Adam, torch.optim.Adam], ids=["danlu.Adam", "torch.optim.Adam"])
def test_gradient_clipping_of_a_complex_parameter_equals_its_real_pairs(mode: dict[str, float], base: type) -> None:
    cls = danlu.extend_with_gradient_clipping(base)
    kwargs = {"lr": 0.1, "foreach": False, **mode}
    got, want = _complex_run(cls, kwargs), _complex_run(cls, kwargs, real_pairs=True)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-15)
