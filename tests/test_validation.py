"""Bad input: every argument is checked at construction, the error names it, and nothing changes."""

from __future__ import annotations

import io
import math
import re
import warnings
from typing import Any

import pytest
import torch

import danlu


def params() -> list[tuple[str, torch.nn.Parameter]]:
    return [("dense.kernel", torch.nn.Parameter(torch.ones(3, 2))), ("dense.bias", torch.nn.Parameter(torch.zeros(2)))]


BAD_CONSTRUCTOR_ARGS: list[tuple[type, dict[str, Any], type, str]] = [
    (danlu.SGD, dict(lr=-0.1), ValueError, "lr"),
    (danlu.SGD, dict(lr=math.nan), ValueError, "lr"),
    (danlu.SGD, dict(lr=math.inf), ValueError, "lr"),
    (danlu.SGD, dict(lr="0.1"), TypeError, "lr"),
    (danlu.SGD, dict(lr=0.1, momentum=-0.9), ValueError, "momentum"),
    (danlu.SGD, dict(lr=0.1, dampening=-1), ValueError, "dampening"),
    (danlu.SGD, dict(lr=0.1, nesterov=True), ValueError, "nesterov"),
    (danlu.SGD, dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), ValueError, "nesterov"),
    (danlu.SGD, dict(lr=0.1, nesterov="yes"), TypeError, "nesterov"),
    (danlu.Adagrad, dict(eps=-1e-10), ValueError, "eps"),
    (danlu.Adagrad, dict(initial_accumulator_value=-0.1), ValueError, "initial_accumulator_value"),
    (danlu.Adadelta, dict(rho=1.5), ValueError, "rho"),
    (danlu.Adadelta, dict(rho=-0.1), ValueError, "rho"),
    (danlu.Adadelta, dict(eps=-1.0), ValueError, "eps"),
    (danlu.RMSprop, dict(alpha=-0.5), ValueError, "alpha"),
    (danlu.RMSprop, dict(momentum=-0.5), ValueError, "momentum"),
    (danlu.RMSprop, dict(centered=1), TypeError, "centered"),
    (danlu.Adam, dict(betas=(1.0, 0.999)), ValueError, "betas[0]"),
    (danlu.Adam, dict(betas=(0.9, -0.1)), ValueError, "betas[1]"),
    (danlu.Adam, dict(betas=(0.9,)), ValueError, "betas"),
    (danlu.Adam, dict(betas=0.9), TypeError, "betas"),
    (danlu.Adam, dict(betas=(0.9, "x")), TypeError, "betas[1]"),
    (danlu.Adam, dict(eps=-1e-6), ValueError, "eps"),
    (danlu.Adam, dict(bias_correction="no"), TypeError, "bias_correction"),
    (danlu.Adam, dict(foreach=1), TypeError, "foreach"),
    (danlu.NAdam, dict(momentum_decay=-1.0), ValueError, "momentum_decay"),
    (danlu.RAdam, dict(betas=(0.9, 1.0)), ValueError, "betas[1]"),
    (danlu.Lion, dict(betas=(0.9, 1.2)), ValueError, "betas[1]"),
    (danlu.Adafactor, dict(lr=-1.0), ValueError, "lr"),
    (danlu.Adafactor, dict(beta1=1.0), ValueError, "beta1"),
    (danlu.Adafactor, dict(beta2=1.0), ValueError, "beta2"),
    (danlu.Adafactor, dict(eps1=-1.0), ValueError, "eps1"),
    (danlu.Adafactor, dict(eps2=-1.0), ValueError, "eps2"),
    (danlu.Adafactor, dict(clipping_threshold=0.0), ValueError, "clipping_threshold"),
    (danlu.Adafactor, dict(min_dim_size_to_factor=-1), ValueError, "min_dim_size_to_factor"),
    (danlu.Adafactor, dict(min_dim_size_to_factor=2.5), TypeError, "min_dim_size_to_factor"),
    (danlu.Adafactor, dict(multiply_by_parameter_scale=None), TypeError, "multiply_by_parameter_scale"),
    (danlu.Adafactor, dict(exclude_from_parameter_scale=["("]), ValueError, "exclude_from_parameter_scale"),
    (danlu.LazyAdam, dict(lr=-1.0), ValueError, "lr"),
    (danlu.Muon, dict(lr=-1.0), ValueError, "lr"),
    (danlu.Muon, dict(momentum=1.0), ValueError, "momentum"),
    (danlu.Muon, dict(momentum=-0.1), ValueError, "momentum"),
    (danlu.Muon, dict(nesterov=1), TypeError, "nesterov"),
    (danlu.Muon, dict(ns_coefficients=(1.0, 2.0)), ValueError, "ns_coefficients"),
    (danlu.Muon, dict(ns_coefficients=(1.0, math.nan, 2.0)), ValueError, "ns_coefficients[1]"),
    (danlu.Muon, dict(ns_coefficients="abc"), TypeError, "ns_coefficients"),
    (danlu.Muon, dict(ns_steps=0), ValueError, "ns_steps"),
    (danlu.Muon, dict(ns_steps=100), ValueError, "ns_steps"),
    (danlu.Muon, dict(ns_steps=5.0), TypeError, "ns_steps"),
    (danlu.Muon, dict(eps=-1e-7), ValueError, "eps"),
    (danlu.Muon, dict(adjust_lr_fn="spectral"), ValueError, "adjust_lr_fn"),
    (danlu.Muon, dict(ns_dtype=torch.int32), ValueError, "ns_dtype"),
    (danlu.Muon, dict(ns_dtype="bfloat16"), TypeError, "ns_dtype"),
    (danlu.Muon, dict(adam_betas=(0.9, 1.0)), ValueError, "adam_betas[1]"),
    (danlu.Muon, dict(adam_betas=0.9), TypeError, "adam_betas"),
    (danlu.Muon, dict(adam_eps=-1e-8), ValueError, "adam_eps"),
    (danlu.Muon, dict(exclude_from_muon=["("]), ValueError, "exclude_from_muon"),
    (danlu.Muon, dict(exclude_from_muon=[3]), TypeError, "exclude_from_muon"),
]

BAD_DERIVATION_ARGS: list[tuple[str, dict[str, Any], type, str]] = [
    ("extend_with_weight_decay", dict(weight_decay_rate=-0.01), ValueError, "weight_decay_rate"),
    ("extend_with_weight_decay", dict(weight_decay_rate="0.1"), TypeError, "weight_decay_rate"),
    ("extend_with_weight_decay", dict(exclude_from_weight_decay=["[unclosed"]), ValueError, "exclude_from_weight_decay"),
    ("extend_with_weight_decay", dict(exclude_from_weight_decay=[3]), TypeError, "exclude_from_weight_decay"),
    ("extend_with_layer_adaptation", dict(exclude_from_layer_adaptation=["*"]), ValueError, "exclude_from_layer_adaptation"),
    ("extend_with_piecewise_linear_lr", dict(lr_schedule={}), ValueError, "lr_schedule"),
    ("extend_with_piecewise_linear_lr", dict(lr_schedule=[(0, 1)]), TypeError, "lr_schedule"),
    ("extend_with_piecewise_linear_lr", dict(lr_schedule={-1: 1.0}), ValueError, "lr_schedule"),
    ("extend_with_piecewise_linear_lr", dict(lr_schedule={1.5: 1.0}), TypeError, "lr_schedule"),
    ("extend_with_piecewise_linear_lr", dict(lr_schedule={10: -1.0}), ValueError, "lr_schedule"),
    ("extend_with_piecewise_linear_lr", dict(lr_schedule={10: math.inf}), ValueError, "lr_schedule"),
    ("extend_with_gradient_accumulation", dict(grad_accum_steps=0), ValueError, "grad_accum_steps"),
    ("extend_with_gradient_accumulation", dict(grad_accum_steps=2.0), TypeError, "grad_accum_steps"),
    ("extend_with_lookahead", dict(steps_per_slow_update=0), ValueError, "steps_per_slow_update"),
    ("extend_with_lookahead", dict(slow_step_size=0.0), ValueError, "slow_step_size"),
    ("extend_with_lookahead", dict(slow_step_size=1.5), ValueError, "slow_step_size"),
    ("extend_with_lazy_optimization", dict(include_in_lazy_optimization=["(?P<"]), ValueError, "include_in_lazy_optimization"),
    ("extend_with_exponential_moving_average", dict(ema_momentum=1.0), ValueError, "ema_momentum"),
    ("extend_with_exponential_moving_average", dict(ema_momentum=-0.1), ValueError, "ema_momentum"),
    ("extend_with_parameter_wise_lr", dict(paramwise_lr_schedule={"dense": -2.0}), ValueError, "paramwise_lr_schedule"),
    ("extend_with_parameter_wise_lr", dict(paramwise_lr_schedule={"dense": math.nan}), ValueError, "paramwise_lr_schedule"),
    ("extend_with_parameter_wise_lr", dict(paramwise_lr_schedule={1: 2.0}), TypeError, "paramwise_lr_schedule"),
    ("extend_with_schedule_free", dict(schedule_free_momentum=1.0), ValueError, "schedule_free_momentum"),
    ("extend_with_schedule_free", dict(schedule_free_momentum=-0.5), ValueError, "schedule_free_momentum"),
    ("extend_with_schedule_free", dict(weight_lr_power=-1.0), ValueError, "weight_lr_power"),
    ("extend_with_schedule_free", dict(weight_lr_power=math.inf), ValueError, "weight_lr_power"),
    ("extend_with_schedule_free", dict(average_power=math.nan), ValueError, "average_power"),
    ("extend_with_schedule_free", dict(average_power="1"), TypeError, "average_power"),
]


@pytest.mark.parametrize("cls,kwargs,error,argument", BAD_CONSTRUCTOR_ARGS, ids=lambda v: str(v)[:40])
def test_bad_constructor_argument_names_the_argument(cls: type, kwargs: dict[str, Any], error: type, argument: str) -> None:
    with pytest.raises(error, match=re.escape(argument)):
        cls(params(), **kwargs)


GROUP_ARGS = [case for case in BAD_CONSTRUCTOR_ARGS if "foreach" not in case[1]]


@pytest.mark.parametrize("cls,kwargs,error,argument", GROUP_ARGS, ids=lambda v: str(v)[:40])
def test_bad_group_argument_names_the_argument(cls: type, kwargs: dict[str, Any], error: type, argument: str) -> None:
    good = {"lr": 0.1} if cls is danlu.SGD else {}
    with pytest.raises(error, match=re.escape(argument)):
        cls([{"params": [p for _, p in params()], **kwargs}], **good)


@pytest.mark.parametrize("factory,kwargs,error,argument", BAD_DERIVATION_ARGS, ids=lambda v: str(v)[:50])
@pytest.mark.parametrize("base", [danlu.Adam, torch.optim.Adam], ids=["danlu", "torch"])
def test_bad_derivation_argument_names_the_argument(factory: str, kwargs: dict[str, Any], error: type, argument: str, base: type) -> None:
    cls = getattr(danlu, factory)(base)
    with pytest.raises(error, match=re.escape(argument)):
        cls(params(), lr=0.1, **kwargs)
    with pytest.raises(error, match=re.escape(argument)):
        cls([{"params": params(), **kwargs}], lr=0.1)


def test_invalid_value_message_names_argument_and_value() -> None:
    with pytest.raises(ValueError, match=r"Invalid lr: -0\.5 \(expected a finite number >= 0\)"):
        danlu.Adam(params(), lr=-0.5)
    with pytest.raises(ValueError, match=r"betas\[0\]\): 1\.0"):
        danlu.Adam(params(), betas=(1.0, 0.9))


@pytest.mark.parametrize(
    "bad,error,message",
    [
        ([], ValueError, "empty parameter list"),
        (torch.nn.Parameter(torch.ones(2)), TypeError, "single Tensor"),
        (42, TypeError, "iterable"),
        ([1.0, 2.0], TypeError, "torch.Tensor"),
        ([{"params": []}], ValueError, "empty parameter list"),
        ([{"lr": 0.1}], ValueError, "'params'"),
        ("weights", TypeError, "torch.Tensor"),
        ([("a", torch.nn.Parameter(torch.ones(1))), torch.nn.Parameter(torch.ones(1))], ValueError, "every parameter has a name"),
    ],
)
def test_bad_params_argument(bad: Any, error: type, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        danlu.Adam(bad)


def test_a_parameter_in_two_groups_or_twice_in_one() -> None:
    w = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="more than one parameter group"):
        danlu.Adam([{"params": [w]}, {"params": [w]}])
    with pytest.raises(ValueError, match="appears twice"):
        danlu.Adam([w, w])


@pytest.mark.parametrize(
    "factory,kwargs,option",
    [
        ("extend_with_weight_decay", dict(exclude_from_weight_decay=["bias"]), "exclude_from_weight_decay"),
        ("extend_with_layer_adaptation", dict(exclude_from_layer_adaptation=["Norm"]), "exclude_from_layer_adaptation"),
        ("extend_with_lazy_optimization", dict(include_in_lazy_optimization=["emb"]), "include_in_lazy_optimization"),
        ("extend_with_parameter_wise_lr", dict(paramwise_lr_schedule={"dense": 0.1}), "paramwise_lr_schedule"),
    ],
)
@pytest.mark.parametrize("base", [danlu.Adam, torch.optim.Adam], ids=["danlu", "torch"])
def test_name_based_option_without_names_is_an_error(factory: str, kwargs: dict[str, Any], option: str, base: type) -> None:
    cls = getattr(danlu, factory)(base)
    with pytest.raises(ValueError, match=f"{option} matches parameter names.*built without names"):
        cls([p for _, p in params()], lr=0.1, **kwargs)


def test_adafactor_exclusion_without_names_is_an_error() -> None:
    with pytest.raises(ValueError, match="exclude_from_parameter_scale.*without names"):
        danlu.Adafactor([p for _, p in params()], exclude_from_parameter_scale=["bias"])


@pytest.mark.parametrize("base", [danlu.Adam, torch.optim.SGD], ids=["danlu", "torch"])
def test_unknown_keyword_is_a_type_error_naming_it(base: type) -> None:
    cls = danlu.extend_with_lookahead(base)
    with pytest.raises(TypeError, match="slow_stepsize"):
        cls(params(), lr=0.1, slow_stepsize=0.5)


@pytest.mark.parametrize("bad", [danlu.Adam(params()), "Adam", torch.nn.Linear, 3, None])
def test_extending_something_that_is_not_an_optimizer_class(bad: Any) -> None:
    with pytest.raises(TypeError, match="extend_with_lookahead: expected a torch.optim.Optimizer subclass"):
        danlu.extend_with_lookahead(bad)


def test_extending_twice_with_the_same_derivation() -> None:
    with pytest.raises(ValueError, match="already has the lookahead derivation"):
        danlu.extend_with_lookahead(danlu.Ranger)


def test_bad_class_name() -> None:
    with pytest.raises(TypeError, match="name"):
        danlu.extend_with_lookahead(danlu.Adam, name="not a name")


def test_different_accumulation_steps_per_group() -> None:
    cls = danlu.extend_with_gradient_accumulation(danlu.Adam)
    a, b = params()
    with pytest.raises(ValueError, match="grad_accum_steps must be the same"):
        cls([{"params": [a]}, {"params": [b], "grad_accum_steps": 3}], grad_accum_steps=2)


def test_double_weight_decay_warns() -> None:
    cls = danlu.extend_with_weight_decay(torch.optim.Adam)
    with pytest.warns(UserWarning, match="decayed twice"):
        cls(params(), lr=0.1, weight_decay=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls(params(), lr=0.1)
        danlu.extend_with_weight_decay(torch.optim.AdamW)(params(), lr=0.1, weight_decay_rate=0.0)


def test_pattern_that_matches_nothing_warns() -> None:
    with pytest.warns(UserWarning, match="'LayerNorm' matches no parameter name"):
        danlu.AdamW(params(), exclude_from_weight_decay=["bias", "LayerNorm"])
    with pytest.warns(UserWarning, match="'emb' matches no parameter name"):
        danlu.extend_with_parameter_wise_lr(danlu.Adam)(params(), paramwise_lr_schedule={"emb": 0.1})


def test_a_failed_construction_leaves_the_parameters_alone() -> None:
    pairs = params()
    before = [p.detach().clone() for _, p in pairs]
    with pytest.raises(ValueError):
        danlu.Lamb(pairs, lr=0.1, weight_decay_rate=-1)
    assert all(torch.equal(p, b) for (_, p), b in zip(pairs, before))


# -------------------------------------------------------------------- state dicts
def trained(cls: type, model: torch.nn.Module, **kwargs: Any) -> torch.optim.Optimizer:
    opt = cls(model.named_parameters(), **kwargs)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return opt


@pytest.mark.parametrize(
    "saved,loading,message",
    [
        (danlu.Adam, danlu.Lion, "has unexpected ['exp_avg_sq']"),
        (danlu.Adam, danlu.SGD, "no 'momentum'"),
        (danlu.Adam, danlu.AdamW, "saved without the weight_decay derivation"),
        (danlu.AdamW, danlu.Adam, "saved with the weight_decay derivation"),
        (danlu.Ranger, danlu.RAdam, "saved with the lookahead derivation"),
        (danlu.Adam, danlu.extend_with_exponential_moving_average(danlu.Adam), "saved without the ema derivation"),
    ],
    ids=str,
)
def test_state_dict_of_another_optimizer_is_refused(saved: type, loading: type, message: str) -> None:
    torch.manual_seed(0)
    source = trained(saved, torch.nn.Linear(3, 2), lr=0.1, **({"momentum": 0.9} if saved is danlu.SGD else {}))
    model = torch.nn.Linear(3, 2)
    target = trained(loading, model, lr=0.1, **({"momentum": 0.9} if loading is danlu.SGD else {}))
    before = io.BytesIO()
    torch.save(target.state_dict(), before)
    with pytest.raises(ValueError, match=re.escape(message)):
        target.load_state_dict(source.state_dict())
    after = io.BytesIO()
    torch.save(target.state_dict(), after)
    assert before.getvalue() == after.getvalue()


def test_state_dict_with_other_shapes_or_groups_is_refused() -> None:
    source = trained(danlu.Adam, torch.nn.Linear(3, 2), lr=0.1)
    with pytest.raises(ValueError, match=r"'exp_avg' of shape \(2, 3\), expected \(4, 3\)"):
        trained(danlu.Adam, torch.nn.Linear(3, 4), lr=0.1).load_state_dict(source.state_dict())
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="parameter group 0 has 2 parameters in the state dict and 4 here"):
        danlu.Adam(model.named_parameters()).load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        danlu.Adam(model.named_parameters()).load_state_dict({"state": {}})


def test_state_dict_missing_derivation_entries_is_refused() -> None:
    source = trained(danlu.Ranger, torch.nn.Linear(3, 2), lr=0.1)
    broken = source.state_dict()
    del broken["state"][0]["lookahead.slow"]
    with pytest.raises(ValueError, match="has no 'lookahead.slow'"):
        trained(danlu.Ranger, torch.nn.Linear(3, 2), lr=0.1).load_state_dict(broken)


def test_load_keeps_state_dtypes() -> None:
    w = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16))
    opt = danlu.NAdam([w])
    w.grad = torch.ones(4, 3, dtype=torch.bfloat16)
    opt.step()
    saved = opt.state_dict()
    fresh = torch.nn.Parameter(torch.ones(4, 3, dtype=torch.bfloat16))
    loaded = danlu.NAdam([fresh])
    loaded.load_state_dict(saved)
    assert {k: v.dtype for k, v in loaded.state[fresh].items()} == {
        "step": torch.float32,
        "mu_product": torch.float64,
        "exp_avg": torch.float32,
        "exp_avg_sq": torch.float32,
    }
