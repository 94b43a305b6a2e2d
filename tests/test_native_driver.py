"""The native driver runs from declarations only: names agree with the C++ source, no optimizer or
derivation is known by name, declared newcomers run natively, and gradient scales are fused."""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor

import danlu
from danlu import _fused, _native, _native_spec
from danlu._native_spec import Col, Fold, Kernel, Mode, NativeSpec, Phase, Slot, Surrounds
from danlu.derivations import Derivation

SRC = Path(danlu.__file__).parent
needs_native = pytest.mark.skipif(not _native.available(), reason="no native kernels on this machine")


def _cpp_enums() -> dict[str, dict[str, int]]:
    source = (SRC / "_kernels.cpp").read_text()
    enums = {}
    for name, body in re.findall(r"enum class (\w+) : int \{([^}]*)\}", source):
        members = [m.strip() for m in body.split(",") if m.strip()]
        enums[name] = {k.strip(): int(v) for k, v in (m.split("=") for m in members)}
    return enums


@pytest.mark.parametrize("enum", [Kernel, Slot, Mode, Phase, Col], ids=lambda e: e.__name__)
def test_python_and_cpp_names_agree(enum):
    assert _cpp_enums()[enum.__name__] == {m.name: int(m.value) for m in enum}


def test_every_elementwise_kernel_has_one_per_element_body():
    source = (SRC / "_kernels.cpp").read_text()
    bodies = re.findall(r"static inline T step\(", source)
    elementwise = [k for k in Kernel if k is not Kernel.ADAFACTOR]
    assert len(bodies) == len(elementwise)
    for kernel in elementwise:
        assert re.search(rf"case Kernel::{kernel.name}: run_list<T, \w+>", source), kernel.name


def _imports(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


@pytest.mark.parametrize("module", ["_fused.py", "_native_spec.py"])
def test_the_driver_imports_no_optimizer_or_derivation(module):
    imported = _imports(SRC / module)
    assert not {m for m in imported if m.startswith(("danlu.optimizers", "danlu.derivations"))}
    assert imported & {"danlu", "danlu._native_spec", "danlu._native", "__future__"}


def test_every_optimizer_declares_its_kernel():
    declared = {cls.native.kernel for cls in (getattr(danlu, n) for n in danlu.optimizers.__all__) if cls.__dict__.get("native")}
    assert declared == set(Kernel)
    assert _fused.spec_for(danlu.LazyAdam([torch.nn.Parameter(torch.zeros(2))])) is None  # overrides, declares nothing


def test_every_registered_derivation_declares_its_fusion():
    from danlu.derivations import ALL_DERIVATIONS

    for derivation in ALL_DERIVATIONS:
        assert isinstance(derivation.native, _native_spec.Fusion), type(derivation).__name__


# ------------------------------------------------------------------------------- newcomers


def _adam_row(group: Mapping[str, Any], state: Mapping[str, Any], lr: float, step: float) -> list[float]:
    beta1, beta2 = group["betas"]
    return [1 - beta1, beta2, 1 - beta2, (1 - beta2**step) ** 0.5, group["eps"], -lr / (1 - beta1**step)]


class PlainAdam(danlu.DanluOptimizer):
    """An optimizer danlu has never heard of, declaring the Adam kernel."""

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, **kw: Any):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps), **kw)

    def _init_state(self, p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
        state["m"] = torch.zeros_like(p)
        state["v"] = torch.zeros_like(p)

    native: ClassVar[NativeSpec | None] = NativeSpec(Kernel.ADAM, lambda group: ("m", "v"), _adam_row)

    def _update_single(self, group: Mapping[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, step: float) -> Tensor:
        beta1, beta2 = group["betas"]
        state["m"].lerp_(grad, 1 - beta1)
        state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = state["v"].sqrt().div_((1 - beta2**step) ** 0.5).add_(group["eps"])
        return state["m"].div(denom).mul_(-lr / (1 - beta1**step))


class HalfUpdate(Derivation):
    """A derivation danlu has never heard of, declaring a fold: the update times 0.5."""

    name, title, has_transform = "half", "HalfUpdate", True
    native = Fold(lambda group, name: (0.5, 0.0))

    def transform(self, host: Any, group: Any, olds: Any, updates: list[Tensor], grads: Any, names: Any, lrs: Any) -> None:
        torch._foreach_mul_(updates, 0.5)


class Undeclared(HalfUpdate):
    """The same transform without a declaration: the generic path."""

    native = None


class Shifted(Derivation):
    """A newcomer whose hooks surround the pass: the base steps p - 1, the parameters then hold the result + 1."""

    name, title = "shifted", "Shifted"
    native = Surrounds()

    def prepare(self, host: Any, group: dict[str, Any], params: list[Tensor]) -> None:
        torch._foreach_sub_(params, 1.0)

    def after_step(self, host: Any, group: dict[str, Any], params: list[Tensor]) -> None:
        torch._foreach_add_(params, 1.0)


class ScaleGradients(Derivation):
    """A gradient hook: scales every gradient (floats for some tensors, 0-d tensors for others)."""

    name, title, has_gradient_hook = "scale", "ScaleGradients", True

    def transform_gradients(self, host: Any, ctx: Any) -> None:
        for index, (_, p) in enumerate(ctx.params_with_gradient()):
            ctx.scale(p, 0.25 if index % 2 else torch.tensor(3.0, dtype=torch.float64))


def _pair(cls: type, dtype: torch.dtype, **kw: Any) -> tuple[list[Any], list[Any], Any, Any]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (7,), (3, 2, 2)]
    fast = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in fast]
    return fast, ref, cls(fast, **kw), cls(ref, foreach=False, **kw)


def _run(cls: type, dtype: torch.dtype = torch.float64, calls: int = 6, **kw: Any) -> int:
    fast, ref, a, b = _pair(cls, dtype, **kw)
    before = _fused.STATS["native_tensors"]
    for call in range(calls):
        gen = torch.Generator().manual_seed(10 + call)
        grads = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in fast]
        for p, q, g in zip(fast, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for p, q, g in zip(fast, ref, grads):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)
            assert torch.equal(p.grad, g)  # the gradient is never written
    return _fused.STATS["native_tensors"] - before


@needs_native
def test_a_declared_newcomer_optimizer_runs_natively():
    assert _run(PlainAdam, lr=0.01) > 0
    assert _run(danlu.extend_with_lookahead(danlu.extend_with_weight_decay(PlainAdam)), lr=0.01, steps_per_slow_update=2) > 0


@needs_native
def test_a_declared_newcomer_derivation_is_folded():
    assert _run(danlu.derive.extend_with(danlu.Adam, HalfUpdate()), lr=0.01) > 0


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_after_steps_inside_a_surrounding_derivation_fuse_and_those_outside_see_what_it_leaves(dtype):
    """Lookahead inside fuses into the pass (on the shifted parameters); the EMA outside runs after the shift back."""
    inner = danlu.derive.extend_with(danlu.extend_with_lookahead(danlu.Adam), Shifted())
    cls = danlu.extend_with_exponential_moving_average(inner)
    stack = _fused._stack(cls([torch.nn.Parameter(torch.zeros(1))]))
    assert [fusion.mode for _, _, fusion in stack.after] == [Mode.SYNC]
    fast, ref, a, b = _pair(cls, dtype, lr=0.01, steps_per_slow_update=2, ema_momentum=0.6)
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-7)
    before = _fused.STATS["native_tensors"]
    for call in range(5):
        gen = torch.Generator().manual_seed(10 + call)
        for p, q in zip(fast, ref):
            g = torch.randn(p.shape, generator=gen, dtype=dtype)
            p.grad, q.grad = g, g.clone()
        a.step()
        b.step()
        for p, q in zip(fast, ref):
            torch.testing.assert_close(p.detach(), q.detach(), **tolerance)
            for key in ("lookahead.slow", "ema.shadow"):
                torch.testing.assert_close(a.state[p][key], b.state[q][key], **tolerance)
    assert _fused.STATS["native_tensors"] - before == 5 * len(fast)


def test_an_undeclared_transform_keeps_the_generic_path():
    assert _fused.spec_for(danlu.derive.extend_with(danlu.Adam, Undeclared())([torch.nn.Parameter(torch.zeros(1))])) is None
    assert _run(danlu.derive.extend_with(danlu.Adam, Undeclared()), lr=0.01) == 0


@needs_native
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "base", [danlu.Adam, danlu.SGD, danlu.Lion, danlu.Adamax, danlu.Adafactor, danlu.NAdam], ids=lambda c: c.__name__
)
def test_scaled_gradients_run_natively(base, dtype):
    """Gradient scales (floats and 0-d tensors) are folded into the pass; the result is the reference's."""
    cls = danlu.derive.extend_with(danlu.extend_with_weight_decay(base), ScaleGradients())
    kw: dict[str, Any] = dict(lr=0.01, weight_decay_rate=0.1)
    if base is danlu.SGD:
        kw["momentum"] = 0.9
    if base is danlu.Adafactor:
        kw["min_dim_size_to_factor"] = 4
    if dtype == torch.float64:
        assert _run(cls, dtype, **kw) > 0
        return
    fast, ref, a, b = _pair(cls, dtype, **kw)
    before = _fused.STATS["native_tensors"]
    for call in range(5):
        gen = torch.Generator().manual_seed(10 + call)
        for p, q in zip(fast, ref):
            g = torch.randn(p.shape, generator=gen, dtype=dtype)
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
        for p, q in zip(fast, ref):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=2e-7)
    assert _fused.STATS["native_tensors"] > before


def test_torch_fused_adam_leaves_scaled_tensors_to_the_generic_path():
    cls = danlu.derive.extend_with(danlu.AdamW, ScaleGradients())
    _native.disable()
    try:
        before = _fused.STATS["torch_fused_tensors"]
        assert _run(cls, lr=0.01) == 0
        assert _fused.STATS["torch_fused_tensors"] == before  # every tensor has a scale here
    finally:
        _native.enable()


@needs_native
def test_steady_state_reuses_the_plan():
    fast, _, a, _ = _pair(danlu.AdamW, torch.float32, lr=0.01)
    for _ in range(3):
        for p in fast:
            p.grad = torch.ones_like(p)
        a.step()
    plans = a.__dict__[_fused.PLANS]
    plan = next(iter(plans.values()))
    for p in fast:
        p.grad = torch.ones_like(p)
    a.step()
    assert next(iter(plans.values())) is plan
    assert plan.rest == []


@needs_native
@pytest.mark.parametrize(
    ("base", "kw"),
    [
        (danlu.Adam, {}),  # the write pass recomputes u from the new moments
        (danlu.SGD, dict(momentum=0.9)),  # ... from the new buffer
        (danlu.Adagrad, {}),  # u needs g: a pure norm pass, then a full step
        (danlu.NAdam, {}),
        (danlu.RMSprop, dict(momentum=0.5, centered=True)),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_layer_adaptation_with_accumulation_lookahead_and_ema(base, kw):
    """Both passes of layer adaptation, with the accumulated mean formed in them and the after-step work fused."""
    cls = base
    for extend in (
        danlu.extend_with_weight_decay,
        danlu.extend_with_layer_adaptation,
        danlu.extend_with_gradient_accumulation,
        danlu.extend_with_lookahead,
        danlu.extend_with_exponential_moving_average,
    ):
        cls = extend(cls)
    assert _run(cls, calls=8, lr=0.01, grad_accum_steps=2, steps_per_slow_update=2, weight_decay_rate=0.05, **kw) > 0


@needs_native
def test_the_steady_path_takes_the_accumulated_means_and_notices_what_changed(monkeypatch):
    """From the second applying call on, a group defers its means at once and runs the steady pass; a
    replaced buffer, a non-contiguous gradient and a steady pass refused after the deferral are seen."""
    cls = danlu.extend_with_gradient_accumulation(danlu.AdamW)
    fast, ref, a, b = _pair(cls, torch.float64, lr=0.01, weight_decay_rate=0.1, grad_accum_steps=2)
    per_tensor: list[int] = []
    steady: list[bool] = []
    refuse = [False]
    defer_mean, steady_run = _fused.defer_mean, _fused._Plan.steady_run

    def counted_defer_mean(opt: Any, *args: Any) -> bool:
        if opt is a:
            per_tensor.append(1)
        return defer_mean(opt, *args)

    def recorded_steady_run(plan: Any, *args: Any) -> bool:
        done = not refuse[0] and steady_run(plan, *args)  # (the reference optimizer has no plan)
        refuse[0] = False
        steady.append(done)
        return done

    monkeypatch.setattr(_fused, "defer_mean", counted_defer_mean)
    monkeypatch.setattr(_fused._Plan, "steady_run", recorded_steady_run)

    def call(c: int, *, transposed: bool = False) -> tuple[int, list[bool]]:
        per_tensor.clear()
        steady.clear()
        _step_both(fast, ref, a, b, seed=70 + c, transposed=transposed)
        if c % 2:
            assert all(torch.count_nonzero(a.state[p]["accum.grad"]) == 0 for p in fast)
        return len(per_tensor), steady.copy()

    for c in range(2):
        call(c)  # the first applying call defers per tensor and builds the plan
    assert call(2) == (0, [])
    assert call(3) == (0, [True])  # one deferral for the group, no per-tensor one
    call(4)
    a.state[fast[0]]["accum.grad"] = a.state[fast[0]]["accum.grad"].clone()
    assert call(5) == (0, [True])  # the new buffer's sum is in the mean (the comparison says so)
    call(6)
    assert call(7, transposed=True) == (3, [])  # a gradient the kernels cannot read: per tensor
    call(8)
    refuse[0] = True
    assert call(9) == (0, [False])  # deferred for the group, then taken one by one by the general path
    call(10)
    assert call(11) == (0, [True])


@needs_native
def test_steady_path_notices_what_changed():
    """Once a group runs without per-tensor Python, new gradient tensors, a non-contiguous gradient, a
    replaced state tensor, a parameter given new storage and a changed option are all seen."""
    fast, ref, a, b = _pair(danlu.AdamW, torch.float64, lr=0.01)

    def step(call: int, *, transposed: bool = False) -> None:
        _step_both(fast, ref, a, b, seed=50 + call, transposed=transposed)

    for call in range(3):
        step(call)
    plan = next(iter(a.__dict__[_fused.PLANS].values()))
    assert plan.steady is not None
    step(3, transposed=True)
    a.state[fast[0]]["exp_avg"] = a.state[fast[0]]["exp_avg"].clone()
    step(4)
    with torch.no_grad():
        fast[1].data = fast[1].data.clone()
    step(5)
    a.param_groups[0]["weight_decay_rate"] = 0.3
    b.param_groups[0]["weight_decay_rate"] = 0.3
    step(6)
    a.param_groups[0]["lr"] = b.param_groups[0]["lr"] = 0.002
    step(7)


def _step_both(fast: list[Any], ref: list[Any], a: Any, b: Any, *, seed: int, transposed: bool = False) -> None:
    """One step of both optimizers on the same float64 gradients; parameters and state must agree."""
    gen = torch.Generator().manual_seed(seed)
    for p, q in zip(fast, ref):
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        if transposed and g.dim() == 2:
            g = g.t().contiguous().t()  # same values, non-contiguous
        p.grad, q.grad = g, g.clone()
    a.step()
    b.step()
    for p, q in zip(fast, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-12)
        for key in b.state[q]:
            torch.testing.assert_close(a.state[p][key], b.state[q][key], rtol=1e-12, atol=1e-12)
