"""Derivations: contract math on every kind of base, composition order, accumulation, fast = snapshot, no copy."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import danlu
from cases import DERIVATION_CASES, DERIVATIONS, OPTIMIZERS, derive, gradients, named_params, run
from reference import AdamMath, SignMomentumMath, simulate

COMPOSITIONS = [[case.id] for case in DERIVATION_CASES] + [
    ["weight_decay", "layer_adaptation"],
    ["layer_adaptation", "weight_decay"],
    ["gradient_accumulation", "piecewise_linear_lr", "lookahead", "ema"],
    ["paramwise_lr", "lazy", "weight_decay", "layer_adaptation", "lookahead"],
    ["ema", "lookahead", "weight_decay", "gradient_accumulation"],
    ["gradient_accumulation", "clip", "weight_decay"],
    ["clip", "gradient_accumulation", "lookahead"],
    ["weight_decay", "gradient_accumulation", "schedule_free", "ema"],
]
TRANSFORMS = [[case.id] for case in DERIVATION_CASES if case.transforms_update] + [["weight_decay", "layer_adaptation"]]

ORACLE = dict(lr=0.02, eps=1e-8)  # the reference math's Adam
BASES: dict[str, tuple[type, dict[str, Any], Callable[[], Any]]] = {
    "danlu.Adam": (OPTIMIZERS["adam"].cls, ORACLE, lambda: AdamMath(0.02)),
    **{
        name: (OPTIMIZERS[name].cls, {**OPTIMIZERS[name].kwargs, **ORACLE}, lambda: AdamMath(0.02))
        for name in ("torch.Adam", "torch.Adam(foreach)", "torch.Adam(fused)")
    },
    "third-party": (OPTIMIZERS["third-party"].cls, dict(OPTIMIZERS["third-party"].kwargs), lambda: SignMomentumMath(0.01)),
}


def _ids(compositions: list[list[str]]) -> list[str]:
    return ["+".join(c) for c in compositions]


@pytest.mark.filterwarnings("ignore:.*matches no parameter name")
@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("names", COMPOSITIONS, ids=_ids(COMPOSITIONS))
def test_derived_trajectory_follows_the_contract(base_name: str, names: list[str]) -> None:
    base, base_kwargs, make_math = BASES[base_name]
    cls, kwargs = derive(base, names)
    params = named_params()
    sequence = gradients(params, 12)
    initial = {n: p.detach().clone() for n, p in params}
    opt = cls(params, **base_kwargs, **kwargs)
    got = []
    for step_grads in sequence:
        for (_, p), g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        got.append({n: p.detach().clone() for n, p in params})
    grads_by_name = [{n: g for (n, _), g in zip(params, step)} for step in sequence]
    want, ema, applied = simulate(make_math(), [(n, dict(DERIVATIONS[n].kwargs)) for n in names], initial, grads_by_name)
    tolerance = 1e-10 if "fused" not in base_name else 1e-9
    for call, (g_step, w_step) in enumerate(zip(got, want)):
        for n in w_step:
            torch.testing.assert_close(g_step[n], w_step[n], rtol=tolerance, atol=tolerance, msg=lambda m: f"call {call + 1}, {n}: {m}")
    if ema is not None:
        scale = 1 - DERIVATIONS["ema"].kwargs["ema_momentum"] ** applied
        with opt.ema_weights():
            for n, p in params:
                torch.testing.assert_close(p.detach(), ema[n] / scale, rtol=1e-10, atol=1e-10)


def test_weight_decay_then_layer_adaptation_is_lamb_and_the_other_order_differs() -> None:
    outcomes = {}
    for order in (["weight_decay", "layer_adaptation"], ["layer_adaptation", "weight_decay"]):
        cls, kwargs = derive(danlu.Adam, order)
        params = named_params()
        outcomes[tuple(order)] = run(cls(params, lr=0.02, **kwargs), params, gradients(params, 5))
    params = named_params()
    lamb = run(
        danlu.Lamb(params, lr=0.02, **DERIVATIONS["weight_decay"].kwargs, **DERIVATIONS["layer_adaptation"].kwargs),
        params,
        gradients(params, 5),
    )
    for a, b in zip(lamb, outcomes[("weight_decay", "layer_adaptation")]):
        assert torch.equal(a, b)
    assert any(
        not torch.allclose(a, b, rtol=1e-6)
        for a, b in zip(outcomes[("weight_decay", "layer_adaptation")], outcomes[("layer_adaptation", "weight_decay")])
    )


@pytest.mark.parametrize("base", [OPTIMIZERS[n].cls for n in ("adam", "torch.Adam", "third-party")], ids=["danlu", "torch", "third-party"])
def test_k_accumulation_calls_equal_one_step_with_the_mean(base: type) -> None:
    k = 4
    params = named_params()
    sequence = gradients(params, k)
    accumulated = danlu.extend_with_gradient_accumulation(base)(params, lr=0.01, grad_accum_steps=k)
    for call, step_grads in enumerate(sequence, start=1):
        before = {n: p.detach().clone() for n, p in params}
        state_before = {id(p): {key: v.clone() for key, v in accumulated.state[p].items() if key != "accum.grad"} for _, p in params}
        for (_, p), g in zip(params, step_grads):
            p.grad = g.clone()
        accumulated.step()
        if call < k:
            assert all(torch.equal(p.detach(), before[n]) for n, p in params), "a buffering call changed a parameter"
            for _, p in params:
                inner = {key: v for key, v in accumulated.state[p].items() if key != "accum.grad"}
                assert inner.keys() == state_before[id(p)].keys()
                assert all(torch.equal(inner[key], state_before[id(p)][key]) for key in inner)
            assert accumulated.param_groups[0]["applied_steps"] == 0
    plain_params = named_params()
    plain = base(plain_params, lr=0.01)
    mean = [sum(step[i] for step in sequence[::-1]) / k for i in range(len(plain_params))]
    for (_, p), g in zip(plain_params, mean):
        p.grad = g
    plain.step()
    for (_, a), (_, b) in zip(params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert all(float(accumulated.state[p]["accum.grad"].abs().max()) == 0 for _, p in params)
    assert accumulated.param_groups[0]["applied_steps"] == 1 and accumulated.param_groups[0]["calls"] == k


def test_accumulation_does_not_count_buffering_calls_for_schedules() -> None:
    cls = danlu.extend_with_piecewise_linear_lr(danlu.extend_with_gradient_accumulation(danlu.SGD))
    w = torch.nn.Parameter(torch.zeros(1))
    opt = cls([w], lr=1.0, grad_accum_steps=2, lr_schedule={0: 1.0, 2: 3.0})
    values = []
    for _ in range(6):
        w.grad = torch.ones(1)
        opt.step()
        values.append(w.item())
    # applied steps 0, 1, 2 have multipliers 1, 2, 3 (linear from 1 at 0 to 3 at 2)
    assert values == [0.0, -1.0, -1.0, -3.0, -3.0, -6.0]


@pytest.mark.parametrize("names", TRANSFORMS, ids=str)
def test_fast_path_equals_snapshot_path(names: list[str]) -> None:
    results = []
    for base, extra in ((danlu.Adam, {}), (torch.optim.Adam, {"foreach": False})):
        cls, kwargs = derive(base, names)
        params = named_params()
        results.append(run(cls(params, lr=0.02, eps=1e-8, **extra, **kwargs), params, gradients(params, 10)))
    for fast, snapshot in zip(*results):
        torch.testing.assert_close(fast, snapshot, rtol=1e-11, atol=1e-12)


class ParameterCopies(TorchDispatchMode):
    """Counts ops that read a whole parameter into a new tensor (clone, copy, to)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        super().__init__()
        self.pointers = {p.data_ptr() for p in params}
        self.copies: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func.__name__
        if name.startswith(("clone", "_to_copy", "copy")):
            source = args[1] if name.startswith("copy") else args[0]
            if isinstance(source, torch.Tensor) and source.data_ptr() in self.pointers:
                self.copies.append(name.split(".")[0])
        return func(*args, **kwargs)


@pytest.mark.parametrize("spec", ["adamw", "lamb", "adam+lazy+paramwise_lr", "adamw+ema"])
def test_fast_path_makes_no_parameter_copy(spec: str) -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 16))
    extra = dict(include_in_lazy_optimization=["0.weight"], paramwise_lr_schedule={"1.": 0.5}) if "lazy" in spec else {}
    opt = danlu.create_optimizer(model, spec, lr=1e-3, **extra)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    model(torch.tensor([[4, 5]])).sum().backward()
    with ParameterCopies(list(model.parameters())) as mode:
        opt.step()
    assert mode.copies == []


def test_snapshot_path_copies_only_the_parameters_a_transform_selects() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    cls = danlu.extend_with_weight_decay(torch.optim.Adam)
    opt = cls(model.named_parameters(), lr=1e-3, exclude_from_weight_decay=["bias", r"^1\."])
    model(torch.randn(2, 8)).sum().backward()
    with ParameterCopies(list(model.parameters())) as mode:
        opt.step()
    assert mode.copies == ["clone"]


def test_lookahead_slow_weights_start_as_the_parameters() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = danlu.extend_with_lookahead(danlu.SGD)([w], lr=0.1, steps_per_slow_update=2, slow_step_size=0.5)
    w.grad = torch.tensor([1.0])
    opt.step()
    assert w.item() == pytest.approx(0.9)  # no sync yet: bert4keras would give 0.5 * 0.9 here
    opt.step()
    assert w.item() == pytest.approx(1.0 + 0.5 * (0.8 - 1.0))
    assert opt.state[w]["lookahead.slow"].item() == pytest.approx(0.9)


def test_ema_misuse_raises_and_changes_nothing() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = danlu.extend_with_exponential_moving_average(danlu.SGD)([w], lr=0.1)
    with pytest.raises(RuntimeError, match="before any optimizer step"):
        opt.apply_ema_weights()
    with pytest.raises(RuntimeError, match="without a preceding apply_ema_weights"):
        opt.reset_old_weights()
    w.grad = torch.tensor([1.0])
    opt.step()
    opt.apply_ema_weights()
    with pytest.raises(RuntimeError, match="already applied"):
        opt.apply_ema_weights()
    opt.reset_old_weights()
    assert w.item() == pytest.approx(0.9)


def test_ema_context_restores_weights_on_error() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0]))
    opt = danlu.extend_with_exponential_moving_average(danlu.SGD)([w], lr=0.1, ema_momentum=0.5)
    w.grad = torch.tensor([1.0])
    opt.step()
    with pytest.raises(KeyError):
        with opt.ema_weights(bias_correction=False):
            assert w.item() == pytest.approx(0.45)
            raise KeyError("evaluation failed")
    assert w.item() == pytest.approx(0.9)


def test_scheduler_sets_the_base_lr_and_the_schedule_multiplies_it() -> None:
    w = torch.nn.Parameter(torch.zeros(1))
    opt = danlu.extend_with_piecewise_linear_lr(danlu.SGD)([w], lr=1.0, lr_schedule={0: 0.5})
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    moves = []
    for _ in range(3):
        before = w.item()
        w.grad = torch.ones(1)
        opt.step()
        scheduler.step()
        moves.append(before - w.item())
    assert moves == pytest.approx([0.5, 0.05, 0.005])
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_group_options_override_constructor_options() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    cls = danlu.extend_with_weight_decay(danlu.SGD)
    opt = cls([{"params": [a]}, {"params": [b], "weight_decay_rate": 0.0}], lr=0.1, weight_decay_rate=0.5)
    a.grad = torch.zeros(2)
    b.grad = torch.zeros(2)
    opt.step()
    assert a[0].item() == pytest.approx(0.95) and b[0].item() == 1.0


def test_derived_classes_are_optimizer_subclasses_of_their_base() -> None:
    cls = danlu.extend_with_lookahead(danlu.extend_with_weight_decay(torch.optim.SGD), name="MySGD")
    assert issubclass(cls, torch.optim.SGD) and issubclass(cls, torch.optim.Optimizer)
    assert cls.__name__ == "MySGD"
    assert issubclass(danlu.Lamb, danlu.Adam) and issubclass(danlu.Ranger, danlu.RAdam)
