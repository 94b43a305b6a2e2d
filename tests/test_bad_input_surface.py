"""The bad-input table of the whole public surface: each raises ValueError/TypeError naming what is wrong,
and nothing changes (parameters, state, param groups).

Constructors of every optimizer, every derivation's keywords (on danlu's and torch's bases, as
constructor keywords and as group entries), ``extend_with_*`` themselves, ``create_optimizer``,
``add_param_group``, ``step()`` (sparse gradients where unsupported, an lr a scheduler or a hand
broke), the EMA calls out of order, ``load_state_dict`` with every kind of misfit, and
``danlu.distributed.sync_on_apply``. EMA misuse raises ``EMAWeightsError``, which is both a
``ValueError`` (the contract of this table) and a ``RuntimeError`` (what it was before).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

import danlu
from cases import (
    DERIVATIONS,
    FOREIGN_CASES,
    OPTIMIZER_CASES,
    DerivationCase,
    ErrorInput,
    OptimizerCase,
    derivation_error_inputs,
    error_inputs,
    one_per_class,
)
from danlu.derivations.exponential_moving_average import EMAWeightsError


def named_params() -> list[tuple[str, torch.nn.Parameter]]:
    torch.manual_seed(0)
    return [
        ("dense.weight", torch.nn.Parameter(torch.randn(3, 4))),
        ("dense.bias", torch.nn.Parameter(torch.randn(3))),
        ("norm.weight", torch.nn.Parameter(torch.ones(3))),
    ]


def snapshot(opt: torch.optim.Optimizer | None, pairs: list[tuple[str, torch.Tensor]]) -> Any:
    groups = None
    if opt is not None:
        groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
        groups.append([len(g["params"]) for g in opt.param_groups])
    return {
        "params": [p.detach().clone() for _, p in pairs],
        "state": copy.deepcopy(opt.state_dict()["state"]) if opt is not None else None,
        "groups": groups,
        "ema_applied": opt is not None and "_danlu_ema_backup" in opt.__dict__,
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def trained(spec: str = "adamw+lookahead+ema", steps: int = 2, **kwargs: Any) -> tuple[Any, list[tuple[str, Any]]]:
    pairs = named_params()
    opt = danlu.create_optimizer(pairs, spec, lr=0.1, **kwargs)
    for i in range(steps):
        for _, p in pairs:
            p.grad = torch.full_like(p, 0.1 * (i + 1))
        opt.step()
    return opt, pairs


def assert_raises_and_nothing_changes(
    action: Callable[[], Any], error: type, message: str, opt: Any = None, pairs: list[tuple[str, Any]] | None = None
) -> None:
    pairs = pairs if pairs is not None else []
    before = snapshot(opt, pairs)
    with pytest.raises(error, match=re.escape(message)):
        action()
    assert same(before, snapshot(opt, pairs)), "a failed call changed something"


# ------------------------------------------------------------------------------ constructors
BAD_HYPERPARAMETERS: list[tuple[type, ErrorInput]] = list(error_inputs())


@pytest.mark.parametrize("cls,bad", BAD_HYPERPARAMETERS, ids=[f"{cls.__name__}-{bad.id}" for cls, bad in BAD_HYPERPARAMETERS])
def test_constructor_and_group_arguments(cls: type, bad: ErrorInput) -> None:
    pairs = named_params()
    error, message = bad.error, bad.names
    assert_raises_and_nothing_changes(lambda: cls(pairs, **bad.kwargs), error, message, pairs=pairs)
    if "foreach" not in bad.kwargs:
        group = [{"params": [p for _, p in pairs], **bad.kwargs}]
        assert_raises_and_nothing_changes(lambda: cls(group), error, message, pairs=pairs)
        opt, pairs = trained()
        new = torch.nn.Parameter(torch.ones(2))
        if all(option in opt.defaults for option in bad.kwargs):
            group = {"params": [new], **bad.kwargs}
            assert_raises_and_nothing_changes(lambda: opt.add_param_group(group), error, message, opt, pairs)


@pytest.mark.parametrize("cls", [*(case.cls for case in one_per_class()), danlu.create_optimizer], ids=lambda c: c.__name__)
def test_unknown_keyword_is_a_type_error_naming_it(cls: Any) -> None:
    pairs = named_params()
    args = (pairs, "adam") if cls is danlu.create_optimizer else (pairs,)
    assert_raises_and_nothing_changes(lambda: cls(*args, learning_rate=0.1), TypeError, "learning_rate", pairs=pairs)


# ------------------------------------------------------------------------------ derivations
BAD_DERIVATION_KEYWORDS: list[tuple[DerivationCase, ErrorInput]] = list(derivation_error_inputs())


@pytest.mark.parametrize(
    "derivation,bad", BAD_DERIVATION_KEYWORDS, ids=[f"{d.id}-{bad.id}" for d, bad in BAD_DERIVATION_KEYWORDS]
)
@pytest.mark.parametrize("base", ["adam", "torch.SGD"])
def test_derivation_keywords(base: str, derivation: DerivationCase, bad: ErrorInput) -> None:
    pairs = named_params()
    spec = f"{base}+{derivation.id}"
    assert_raises_and_nothing_changes(
        lambda: danlu.create_optimizer(pairs, spec, lr=0.1, **bad.kwargs), bad.error, bad.names, pairs=pairs
    )
    cls = derivation.factory(danlu.Adam if base == "adam" else torch.optim.SGD)
    group = [{"params": pairs, **bad.kwargs}]
    assert_raises_and_nothing_changes(lambda: cls(group, lr=0.1), bad.error, bad.names, pairs=pairs)


NAME_OPTIONS = [(d.name, option) for d in danlu.derivations.ALL_DERIVATIONS for option in d.name_options]


@pytest.mark.parametrize("derivation,option", NAME_OPTIONS)
def test_name_options_need_names(derivation: str, option: str) -> None:
    cls = DERIVATIONS[derivation].factory(danlu.Adam)
    value = {"dense": 0.5} if option == "paramwise_lr_schedule" else ["dense"]
    pairs = named_params()
    assert_raises_and_nothing_changes(lambda: cls([p for _, p in pairs], **{option: value}), ValueError, option, pairs=pairs)


@pytest.mark.parametrize("name", [n for n in dir(danlu) if n.startswith("extend_with_")])
def test_extend_with_arguments(name: str) -> None:
    factory = getattr(danlu, name)
    for bad in (None, 3, danlu.Adam([torch.nn.Parameter(torch.ones(1))]), torch.nn.Linear, "Adam"):
        with pytest.raises(TypeError, match="torch.optim.Optimizer subclass"):
            factory(bad)
    for bad_name in (3, "not a name", ""):
        with pytest.raises(TypeError, match="name"):
            factory(danlu.Adam, name=bad_name)
    with pytest.raises(ValueError, match="already has"):
        factory(factory(danlu.Adam))


# ------------------------------------------------------------------------------ create_optimizer
@pytest.mark.parametrize(
    "args,kwargs,error,message",
    [
        (("adamw",), dict(spec=None), TypeError, "spec"),
        ((3,), {}, TypeError, "spec must be a string"),
        (("adamx",), {}, ValueError, "unknown optimizer 'adamx'"),
        (("adamw+lookahed",), {}, ValueError, "unknown derivation 'lookahed'"),
        (("adamw+ema+ema",), {}, ValueError, "appears twice"),
        (("adamw++ema",), {}, ValueError, "invalid spec"),
        (("",), {}, ValueError, "invalid spec"),
        (("torch.NotAnOptimizer",), {}, ValueError, "NotAnOptimizer"),
        (("adamw",), dict(no_decay_on_bias_and_norm="yes"), TypeError, "no_decay_on_bias_and_norm"),
        (("adamw",), dict(weight_decay_rate=-1.0), ValueError, "weight_decay_rate"),
        (("lamb+warmup",), dict(lr_schedule={-1: 1.0}), ValueError, "lr_schedule"),
    ],
)
def test_create_optimizer_arguments(args: tuple[Any, ...], kwargs: dict[str, Any], error: type, message: str) -> None:
    pairs = named_params()
    if "spec" in kwargs:
        kwargs = dict(kwargs)
        args = ()
        spec = kwargs.pop("spec")
        assert_raises_and_nothing_changes(lambda: danlu.create_optimizer(pairs, spec, **kwargs), error, message, pairs=pairs)
        return
    assert_raises_and_nothing_changes(lambda: danlu.create_optimizer(pairs, *args, **kwargs), error, message, pairs=pairs)


@pytest.mark.parametrize("bad,error", [(None, TypeError), (3, TypeError), ("model", TypeError), ([], ValueError), ([1, 2], TypeError)])
def test_create_optimizer_model_argument(bad: Any, error: type) -> None:
    with pytest.raises(error, match="model_or_named_params|no parameters"):
        danlu.create_optimizer(bad, "adamw")


# ------------------------------------------------------------------------------ step()
DENSE_ONLY_SPECS = [case.spec for case in OPTIMIZER_CASES if case.spec and not case.supports_sparse]


@pytest.mark.parametrize("spec", [*DENSE_ONLY_SPECS, "lamb+ema", "adamw+gradient_accumulation"])
def test_sparse_gradients_where_unsupported(spec: str) -> None:
    opt, pairs = trained(spec)
    name, p = pairs[0]
    p.grad = torch.zeros_like(p).to_sparse()
    assert_raises_and_nothing_changes(opt.step, ValueError, f"does not support sparse gradients (parameter {name!r})", opt, pairs)


SPARSE_CASES = [case for case in OPTIMIZER_CASES if case.supports_sparse]


@pytest.mark.parametrize("case", SPARSE_CASES, ids=[case.id for case in SPARSE_CASES])
def test_sparse_gradients_where_supported(case: OptimizerCase) -> None:
    emb = torch.nn.Embedding(5, 2, sparse=True)
    before = emb.weight.detach().clone()
    opt = danlu.extend_with_exponential_moving_average(case.cls)(emb.named_parameters(), **case.kwargs)
    emb(torch.tensor([1])).sum().backward()
    opt.step()
    assert not torch.equal(emb.weight.detach()[1], before[1]) and torch.equal(emb.weight.detach()[0], before[0])


LR_SPECS = [
    *(case.spec for case in OPTIMIZER_CASES if case.spec),
    *(f"{case.spec}+ema" for case in FOREIGN_CASES if case.spec),  # a bare torch.optim class is torch's, not danlu's
    "adamw+lookahead+ema",
    "adafactor+gradient_accumulation",
]


@pytest.mark.parametrize("bad,error", [(math.nan, ValueError), (-0.1, ValueError), (math.inf, ValueError), ("0.1", TypeError)])
@pytest.mark.parametrize("spec", LR_SPECS)
def test_an_lr_broken_after_construction_is_refused_before_anything_changes(spec: str, bad: Any, error: type) -> None:
    opt, pairs = trained(spec)
    for _, p in pairs:
        p.grad = torch.ones_like(p)
    before = snapshot(opt, pairs)
    opt.param_groups[0]["lr"] = bad
    with pytest.raises(error, match="lr"):
        opt.step()
    opt.param_groups[0]["lr"] = before["groups"][0]["lr"]
    assert same(before, snapshot(opt, pairs))


def test_ema_calls_out_of_order() -> None:
    pairs = named_params()
    opt = danlu.create_optimizer(pairs, "adamw+ema", lr=0.1)
    assert_raises_and_nothing_changes(opt.apply_ema_weights, ValueError, "before any optimizer step", opt, pairs)
    assert_raises_and_nothing_changes(opt.reset_old_weights, ValueError, "without a preceding apply_ema_weights", opt, pairs)
    opt, pairs = trained("adamw+ema")
    assert_raises_and_nothing_changes(lambda: opt.apply_ema_weights(bias_correction="yes"), TypeError, "bias_correction", opt, pairs)
    opt.apply_ema_weights()
    assert_raises_and_nothing_changes(opt.apply_ema_weights, ValueError, "already applied", opt, pairs)
    for _, p in pairs:
        p.grad = torch.ones_like(p)
    assert_raises_and_nothing_changes(opt.step, ValueError, "while the averaged weights are applied", opt, pairs)
    opt.reset_old_weights()
    assert_raises_and_nothing_changes(opt.reset_old_weights, ValueError, "without a preceding", opt, pairs)
    assert issubclass(EMAWeightsError, RuntimeError)  # what callers caught before


# ------------------------------------------------------------------------------ load_state_dict
def saved_from(spec: str, **kwargs: Any) -> dict[str, Any]:
    opt, _ = trained(spec, **kwargs)
    return copy.deepcopy(opt.state_dict())


def corrupt(state: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    state = copy.deepcopy(state)
    where: Any = state
    keys = path.split("/")
    for key in keys[:-1]:
        where = where[int(key) if isinstance(where, list) or (key.isdigit() and int(key) in where) else key]
    last: Any = keys[-1]
    if isinstance(where, dict) and where and all(isinstance(k, int) for k in where):
        last = int(last)
    if value is KeyError:
        del where[last]
    else:
        where[last] = value
    return state


STATE_DICT_CASES: list[tuple[str, Callable[[], Any], type, str]] = [
    ("not a dict", lambda: [1, 2], ValueError, "state_dict must be a dict"),
    ("no state", lambda: {"param_groups": []}, ValueError, "'state' and 'param_groups'"),
    ("other optimizer", lambda: saved_from("lion+weight_decay+lookahead+ema"), ValueError, "saved from another optimizer"),
    ("without a derivation", lambda: saved_from("adamw+lookahead"), ValueError, "saved without the ema derivation"),
    ("with another derivation", lambda: saved_from("adamw+lookahead+ema+skip_nonfinite"), ValueError, "skip_nonfinite derivation"),
    ("missing slow weights", lambda: corrupt(saved_from("adamw+lookahead+ema"), "state/0/lookahead.slow", KeyError), ValueError, "lookahead.slow"),
    ("wrong shape", lambda: corrupt(saved_from("adamw+lookahead+ema"), "state/0/exp_avg", torch.zeros(4, 3)), ValueError, "'exp_avg' of shape (4, 3)"),
    ("not a tensor", lambda: corrupt(saved_from("adamw+lookahead+ema"), "state/0/ema.shadow", [0.0]), ValueError, "'ema.shadow' = list"),
    ("state of an unknown parameter", lambda: corrupt(saved_from("adamw+lookahead+ema"), "state/7", {}), ValueError, "parameter index 7"),
    ("bad ema_momentum", lambda: corrupt(saved_from("adamw+lookahead+ema"), "param_groups/0/ema_momentum", 1.5), ValueError, "ema_momentum"),
    ("bad slow_step_size", lambda: corrupt(saved_from("adamw+lookahead+ema"), "param_groups/1/slow_step_size", "x"), TypeError, "slow_step_size"),
]


@pytest.mark.parametrize("case,make,error,message", STATE_DICT_CASES, ids=[c[0] for c in STATE_DICT_CASES])
def test_load_state_dict_that_does_not_fit(case: str, make: Callable[[], Any], error: type, message: str) -> None:
    opt, pairs = trained("adamw+lookahead+ema")
    bad = make()
    assert_raises_and_nothing_changes(lambda: opt.load_state_dict(bad), error, message, opt, pairs)


def test_load_state_dict_of_other_groups_or_sizes() -> None:
    opt, pairs = trained("adamw+lookahead+ema")
    single = danlu.create_optimizer([pairs[0]], "adamw+lookahead+ema", lr=0.1).state_dict()
    assert_raises_and_nothing_changes(lambda: opt.load_state_dict(single), ValueError, "parameter groups", opt, pairs)
    warm = saved_from("adamw+warmup+lookahead+ema", lr_schedule={0: 1.0})
    assert_raises_and_nothing_changes(lambda: opt.load_state_dict(warm), ValueError, "piecewise_linear_lr", opt, pairs)
    bad_schedule = corrupt(warm, "param_groups/0/lr_schedule", {"x": 1.0})
    warm_opt, warm_pairs = trained("adamw+warmup+lookahead+ema", lr_schedule={0: 1.0})
    assert_raises_and_nothing_changes(lambda: warm_opt.load_state_dict(bad_schedule), TypeError, "lr_schedule", warm_opt, warm_pairs)


# ------------------------------------------------------------------------------ danlu.distributed
def test_sync_on_apply_arguments() -> None:
    opt, _ = trained("adamw+gradient_accumulation")
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        with danlu.distributed.sync_on_apply(torch.nn.Linear(2, 2), "adam"):  # type: ignore[arg-type]
            pass
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        with danlu.distributed.sync_on_apply(torch.nn.Linear(2, 2), opt):
            pass
