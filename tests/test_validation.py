"""Bad input: every argument is checked at construction, the error names it, and nothing changes."""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import danlu
from cases import DERIVATION_CASES, derivation_error_inputs, error_inputs


def params() -> list[tuple[str, torch.nn.Parameter]]:
    return [("dense.kernel", torch.nn.Parameter(torch.ones(3, 2))), ("dense.bias", torch.nn.Parameter(torch.zeros(2)))]


BAD_CONSTRUCTOR_ARGS: list[tuple[type, dict[str, Any], type, str]] = [
    (cls, dict(bad.kwargs), bad.error, bad.names) for cls, bad in error_inputs()
]

BAD_DERIVATION_ARGS: list[tuple[Callable[[type], type], dict[str, Any], type, str]] = [
    (case.factory, dict(bad.kwargs), bad.error, bad.names) for case, bad in derivation_error_inputs()
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


@pytest.mark.parametrize("factory,kwargs,error,argument", BAD_DERIVATION_ARGS, ids=lambda v: getattr(v, "__name__", str(v))[:50])
@pytest.mark.parametrize("base", [danlu.Adam, torch.optim.Adam], ids=["danlu", "torch"])
def test_bad_derivation_argument_names_the_argument(
    factory: Callable[[type], type], kwargs: dict[str, Any], error: type, argument: str, base: type
) -> None:
    cls = factory(base)
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


NAME_OPTIONS = {d.name: d.name_options for d in danlu.derivations.ALL_DERIVATIONS}
NAMED = [
    (case.factory, {option: case.kwargs[option]}, option)
    for case in DERIVATION_CASES
    if case.needs_names
    for option in NAME_OPTIONS[case.id]
    if option in case.kwargs
]


@pytest.mark.parametrize("factory,kwargs,option", NAMED, ids=[option for _, _, option in NAMED])
@pytest.mark.parametrize("base", [danlu.Adam, torch.optim.Adam], ids=["danlu", "torch"])
def test_name_based_option_without_names_is_an_error(
    factory: Callable[[type], type], kwargs: dict[str, Any], option: str, base: type
) -> None:
    cls = factory(base)
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
