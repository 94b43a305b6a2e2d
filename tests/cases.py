"""The two tables that drive every cross-cutting test: optimizer cases and derivation cases.

In the manner of torch's ``OptimizerInfo``: one row per configuration to test, with the flags that
say what the configuration can do (sparse gradients, complex parameters, a native-kernel form, ...),
so that a test selects its rows by capability rather than by listing classes.
``tests/test_contract.py`` fails when a public optimizer or derivation has no row here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

import danlu
from reference import SignMomentum


@dataclass(frozen=True)
class ErrorInput:
    """Constructor keywords that must raise ``error`` with a message containing ``names``."""

    kwargs: Mapping[str, Any]
    error: type[Exception]
    names: str

    @property
    def id(self) -> str:
        return ",".join(f"{k}={v!r}"[:30] for k, v in self.kwargs.items())


@dataclass(frozen=True)
class TorchReference:
    """The ``torch.optim`` class and keywords that an optimizer case must equal, to a tolerance."""

    cls: type[torch.optim.Optimizer]
    kwargs: Mapping[str, Any]
    tolerance: float = 1e-12


@dataclass(frozen=True)
class OptimizerCase:
    """One optimizer configuration and what it supports."""

    id: str
    cls: type[torch.optim.Optimizer]
    kwargs: Mapping[str, Any]
    spec: str | None = None
    """The ``create_optimizer`` base name this row stands for (with these kwargs)."""
    holds: tuple[str, ...] = ()
    """Derivations the class already has (``AdamW`` holds ``weight_decay``): not to be added again."""
    supports_sparse: bool = False
    supports_complex: bool = True
    """True: complex parameters are updated as their ``view_as_real`` pairs; False: a ValueError naming the parameter."""
    needs_names: bool = False
    """Built from ``(name, tensor)`` pairs only: an option of the row matches parameter names."""
    factored: bool = False
    """A matrix (second-largest dimension >= ``min_dim_size_to_factor``) keeps its second moment as row and column factors."""
    has_foreach: bool = True
    """``foreach=True`` runs a form of its own (so "foreach equals the per-tensor loop" compares two things)."""
    native: bool = True
    """The default step runs the native kernels where they are built (``tests/test_fastpath.py`` checks it)."""
    torch_reference: TorchReference | None = None
    tolerance: float = 1e-12
    """float64 tolerance of "foreach equals the per-tensor loop" and the other comparisons of two forms."""
    error_inputs: tuple[ErrorInput, ...] = ()
    """Constructor arguments that must be refused (besides the lr checks every class gets)."""

    @property
    def derived(self) -> bool:
        return bool(self.holds) or self.foreign

    @property
    def foreign(self) -> bool:
        """Not a danlu optimizer class (``torch.optim.Adam``, a third party's)."""
        return not issubclass(self.cls, danlu.DanluOptimizer)

    @property
    def float_lr(self) -> bool:
        return isinstance(self.kwargs.get("lr"), float)

    def build(self, params: Any, **overrides: Any) -> torch.optim.Optimizer:
        return self.cls(params, **{**self.kwargs, **overrides})


@dataclass(frozen=True)
class DerivationCase:
    """One derivation, the keywords its tests use, and what it does."""

    id: str
    """Its name in ``create_optimizer`` specs and in ``danlu.derivations.ALL_DERIVATIONS``."""
    factory: Callable[..., type]
    kwargs: Mapping[str, Any]
    needs_names: bool = False
    accumulates: bool = False
    """Some calls only buffer the gradient (no step of the base)."""
    has_after_step: bool = False
    """Acts on the parameters after the base's update (Lookahead, EMA)."""
    transforms_update: bool = False
    """Rewrites the proposed update of the tensors it selects."""
    error_inputs: tuple[ErrorInput, ...] = ()
    """Keywords that must be refused, as constructor keywords and as param-group entries."""


def _e(error: type[Exception], names: str, **kwargs: Any) -> ErrorInput:
    return ErrorInput(kwargs, error, names)


def derivation_error_inputs() -> Iterator[tuple[DerivationCase, ErrorInput]]:
    for case in DERIVATION_CASES:
        for bad in case.error_inputs:
            yield case, bad


D = danlu
ADAM_EPS = 1e-6  # bert4keras' eps, danlu.Adam's default (torch.optim.Adam's is 1e-8)

OPTIMIZER_CASES: list[OptimizerCase] = [
    OptimizerCase(
        "sgd", D.SGD, dict(lr=0.1), spec="sgd",
        torch_reference=TorchReference(torch.optim.SGD, dict(lr=0.1)),
        error_inputs=(
            _e(ValueError, "momentum", lr=0.1, momentum=-0.9),
            _e(ValueError, "momentum", lr=0.1, momentum=-0.1),
            _e(ValueError, "dampening", lr=0.1, dampening=-1),
            _e(ValueError, "dampening", lr=0.1, dampening=-0.1),
            _e(ValueError, "nesterov", lr=0.1, nesterov=True),
            _e(ValueError, "nesterov", lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
            _e(TypeError, "nesterov", lr=0.1, nesterov="yes"),
        ),
    ),
    OptimizerCase(
        "sgd_momentum", D.SGD, dict(lr=0.05, momentum=0.9), spec="sgdm",
        torch_reference=TorchReference(torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
    ),
    OptimizerCase(
        "sgd_dampening", D.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3),
        torch_reference=TorchReference(torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ),
    OptimizerCase(
        "sgd_nesterov", D.SGD, dict(lr=0.05, momentum=0.9, nesterov=True), spec="nag",
        torch_reference=TorchReference(torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    ),
    OptimizerCase(
        "adagrad", D.Adagrad, dict(lr=0.1, initial_accumulator_value=0.1), spec="adagrad",
        torch_reference=TorchReference(torch.optim.Adagrad, dict(lr=0.1, initial_accumulator_value=0.1)),
        error_inputs=(
            _e(ValueError, "eps", eps=-1e-10),
            _e(ValueError, "initial_accumulator_value", initial_accumulator_value=-0.1),
            _e(ValueError, "initial_accumulator_value", initial_accumulator_value=-1.0),
        ),
    ),
    OptimizerCase(
        "adadelta", D.Adadelta, dict(lr=1.0, rho=0.8), spec="adadelta",
        torch_reference=TorchReference(torch.optim.Adadelta, dict(lr=1.0, rho=0.8)),
        error_inputs=(
            _e(ValueError, "rho", rho=1.5),
            _e(ValueError, "rho", rho=1.01),
            _e(ValueError, "rho", rho=-0.1),
            _e(ValueError, "eps", eps=-1.0),
        ),
    ),
    OptimizerCase(
        "rmsprop", D.RMSprop, dict(lr=0.01), spec="rmsprop",
        torch_reference=TorchReference(torch.optim.RMSprop, dict(lr=0.01)),
        error_inputs=(
            _e(ValueError, "alpha", alpha=-0.5),
            _e(ValueError, "momentum", momentum=-0.5),
            _e(ValueError, "momentum", momentum=-1.0),
            _e(ValueError, "eps", eps=math.nan),
            _e(TypeError, "centered", centered=1),
        ),
    ),
    OptimizerCase(
        "rmsprop_momentum", D.RMSprop, dict(lr=0.01, momentum=0.5),
        torch_reference=TorchReference(torch.optim.RMSprop, dict(lr=0.01, momentum=0.5)),
    ),
    OptimizerCase(
        "rmsprop_centered_momentum", D.RMSprop, dict(lr=0.01, momentum=0.5, centered=True),
        torch_reference=TorchReference(torch.optim.RMSprop, dict(lr=0.01, momentum=0.5, centered=True)),
    ),
    OptimizerCase(
        "adam", D.Adam, dict(lr=0.01), spec="adam",
        torch_reference=TorchReference(torch.optim.Adam, dict(lr=0.01, eps=ADAM_EPS)),
        error_inputs=(
            _e(ValueError, "betas[0]", betas=(1.0, 0.999)),
            _e(ValueError, "betas", betas=(-0.1, 0.999)),
            _e(ValueError, "betas[1]", betas=(0.9, -0.1)),
            _e(ValueError, "betas", betas=(0.9, 1.0)),
            _e(ValueError, "betas", betas=(0.9,)),
            _e(ValueError, "betas", betas=(0.9, 0.99, 0.9)),
            _e(TypeError, "betas", betas=0.9),
            _e(TypeError, "betas", betas="0.9"),
            _e(TypeError, "betas[1]", betas=(0.9, "x")),
            _e(ValueError, "eps", eps=-1e-6),
            _e(TypeError, "bias_correction", bias_correction="no"),
            _e(TypeError, "bias_correction", bias_correction=None),
            _e(TypeError, "foreach", foreach=1),
        ),
    ),
    OptimizerCase("adam_no_bias_correction", D.Adam, dict(lr=0.01, bias_correction=False, eps=1e-3)),
    OptimizerCase(
        "adamax", D.Adamax, dict(lr=0.01), spec="adamax",
        torch_reference=TorchReference(torch.optim.Adamax, dict(lr=0.01)),
        error_inputs=(
            _e(ValueError, "betas", betas=(1.0, 0.999)),
            _e(ValueError, "betas[1]", betas=(0.9, -0.1)),
            _e(ValueError, "eps", eps=-1e-8),
        ),
    ),
    OptimizerCase(
        "nadam", D.NAdam, dict(lr=0.01), spec="nadam",
        torch_reference=TorchReference(torch.optim.NAdam, dict(lr=0.01)),
        error_inputs=(
            _e(ValueError, "momentum_decay", momentum_decay=-1.0),
            _e(ValueError, "momentum_decay", momentum_decay=-4e-3),
            _e(ValueError, "betas", betas=(0.9, 1.5)),
        ),
    ),
    OptimizerCase(
        "radam", D.RAdam, dict(lr=0.01), spec="radam",
        torch_reference=TorchReference(torch.optim.RAdam, dict(lr=0.01)),
        error_inputs=(_e(ValueError, "betas[1]", betas=(0.9, 1.0)), _e(ValueError, "eps", eps=-1.0)),
    ),
    OptimizerCase(
        "adafactor", D.Adafactor, dict(lr=0.01, min_dim_size_to_factor=2), spec="adafactor",
        supports_complex=False, factored=True, has_foreach=False,
        error_inputs=(
            _e(ValueError, "lr", lr=-1.0),
            _e(ValueError, "beta1", beta1=1.0),
            _e(ValueError, "beta2", beta2=1.0),
            _e(ValueError, "beta2", beta2=-0.1),
            _e(ValueError, "eps1", eps1=-1.0),
            _e(ValueError, "eps2", eps2=-1.0),
            _e(ValueError, "eps2", eps2=math.nan),
            _e(ValueError, "clipping_threshold", clipping_threshold=0.0),
            _e(ValueError, "clipping_threshold", clipping_threshold=-1.0),
            _e(ValueError, "min_dim_size_to_factor", min_dim_size_to_factor=-1),
            _e(TypeError, "min_dim_size_to_factor", min_dim_size_to_factor=2.5),
            _e(TypeError, "min_dim_size_to_factor", min_dim_size_to_factor=128.0),
            _e(TypeError, "multiply_by_parameter_scale", multiply_by_parameter_scale=None),
            _e(TypeError, "multiply_by_parameter_scale", multiply_by_parameter_scale="true"),
            _e(ValueError, "exclude_from_parameter_scale", exclude_from_parameter_scale=["("]),
            _e(ValueError, "exclude_from_parameter_scale", exclude_from_parameter_scale=["(unclosed"]),
            _e(TypeError, "exclude_from_parameter_scale", exclude_from_parameter_scale=[1]),
        ),
    ),
    OptimizerCase(
        "adafactor_relative_step_momentum", D.Adafactor, dict(lr=None, beta1=0.9, min_dim_size_to_factor=8),
        supports_complex=False, factored=True, has_foreach=False,
    ),
    OptimizerCase(
        "adafactor_no_clip_no_scale", D.Adafactor,
        dict(lr=0.01, beta2=0.9, clipping_threshold=None, multiply_by_parameter_scale=False),
        supports_complex=False, factored=True, has_foreach=False,
    ),
    OptimizerCase(
        "adafactor_excluded_scale", D.Adafactor, dict(lr=0.01, exclude_from_parameter_scale=["bias"], min_dim_size_to_factor=8),
        supports_complex=False, needs_names=True, factored=True, has_foreach=False,
    ),
    OptimizerCase(
        "lion", D.Lion, dict(lr=0.01), spec="lion",
        error_inputs=(_e(ValueError, "betas[1]", betas=(0.9, 1.2)), _e(ValueError, "betas", betas=(1.0, 0.99))),
    ),
    OptimizerCase(
        "muon", D.Muon, dict(lr=0.02, ns_dtype=torch.float64), spec="muon", supports_complex=False,
        error_inputs=(
            _e(ValueError, "momentum", momentum=1.0),
            _e(ValueError, "momentum", momentum=-0.1),
            _e(TypeError, "nesterov", nesterov=1),
            _e(ValueError, "ns_coefficients", ns_coefficients=(1.0, 2.0)),
            _e(ValueError, "ns_coefficients[1]", ns_coefficients=(1.0, math.nan, 2.0)),
            _e(TypeError, "ns_coefficients", ns_coefficients="abc"),
            _e(ValueError, "ns_steps", ns_steps=0),
            _e(ValueError, "ns_steps", ns_steps=100),
            _e(TypeError, "ns_steps", ns_steps=5.0),
            _e(ValueError, "eps", eps=-1e-7),
            _e(ValueError, "adjust_lr_fn", adjust_lr_fn="spectral"),
            _e(ValueError, "ns_dtype", ns_dtype=torch.int32),
            _e(TypeError, "ns_dtype", ns_dtype="bfloat16"),
            _e(ValueError, "adam_betas[1]", adam_betas=(0.9, 1.0)),
            _e(TypeError, "adam_betas", adam_betas=0.9),
            _e(ValueError, "adam_eps", adam_eps=-1e-8),
            _e(ValueError, "exclude_from_muon", exclude_from_muon=["("]),
            _e(TypeError, "exclude_from_muon", exclude_from_muon=[3]),
        ),
    ),
    OptimizerCase(
        "lazyadam", D.LazyAdam, dict(lr=0.01), spec="lazyadam", supports_sparse=True, native=False,
        error_inputs=(_e(ValueError, "betas", betas=(0.9, -0.1)),),
    ),
    OptimizerCase(
        "adamw", D.AdamW, dict(lr=0.01, weight_decay_rate=0.1), spec="adamw", holds=("weight_decay",),
        torch_reference=TorchReference(torch.optim.AdamW, dict(lr=0.01, eps=ADAM_EPS, weight_decay=0.1)),
    ),
    OptimizerCase("lamb", D.Lamb, dict(lr=0.01), spec="lamb", holds=("weight_decay", "layer_adaptation")),
    OptimizerCase("ranger", D.Ranger, dict(lr=0.01, steps_per_slow_update=2), spec="ranger", holds=("lookahead",)),
]
"""Every danlu optimizer class and every ``create_optimizer`` base name has at least one row."""

FOREIGN_CASES: list[OptimizerCase] = [
    OptimizerCase("torch.Adam", torch.optim.Adam, dict(lr=0.01, foreach=False), spec="torch.Adam", native=False),
    OptimizerCase("torch.Adam(foreach)", torch.optim.Adam, dict(lr=0.01, foreach=True), native=False),
    OptimizerCase("torch.Adam(fused)", torch.optim.Adam, dict(lr=0.01, fused=True), native=False, has_foreach=False),
    OptimizerCase("torch.AdamW", torch.optim.AdamW, dict(lr=0.01), spec="torch.AdamW", native=False),
    OptimizerCase("torch.SGD", torch.optim.SGD, dict(lr=0.05, momentum=0.9), spec="torch.SGD", native=False),
    OptimizerCase("third-party", SignMomentum, dict(lr=0.01), supports_complex=False, has_foreach=False, native=False),
]
"""Bases that are not danlu's: derivations must work over them (``extend_with_X(torch.optim.AdamW)``)."""

DERIVATION_CASES: list[DerivationCase] = [
    DerivationCase(
        "weight_decay", D.extend_with_weight_decay, dict(weight_decay_rate=0.1, exclude_from_weight_decay=["bias", "Norm"]),
        needs_names=True, transforms_update=True,
        error_inputs=(
            _e(ValueError, "weight_decay_rate", weight_decay_rate=-1e-2),
            _e(ValueError, "weight_decay_rate", weight_decay_rate=math.nan),
            _e(TypeError, "weight_decay_rate", weight_decay_rate="0.01"),
            _e(ValueError, "exclude_from_weight_decay", exclude_from_weight_decay=["bias", "[oops"]),
            _e(TypeError, "exclude_from_weight_decay", exclude_from_weight_decay=[None]),
            _e(TypeError, "exclude_from_weight_decay", exclude_from_weight_decay=[3]),
            _e(TypeError, "exclude_from_weight_decay", exclude_from_weight_decay=3),
        ),
    ),
    DerivationCase(
        "layer_adaptation", D.extend_with_layer_adaptation, dict(exclude_from_layer_adaptation=["Norm"]),
        needs_names=True, transforms_update=True,
        error_inputs=(
            _e(ValueError, "exclude_from_layer_adaptation", exclude_from_layer_adaptation=["+"]),
            _e(ValueError, "exclude_from_layer_adaptation", exclude_from_layer_adaptation=["*"]),
        ),
    ),
    DerivationCase(
        "piecewise_linear_lr", D.extend_with_piecewise_linear_lr, dict(lr_schedule={2: 1.0, 6: 0.2}),
        error_inputs=(
            _e(ValueError, "lr_schedule", lr_schedule={}),
            _e(TypeError, "lr_schedule", lr_schedule=[(0, 1.0)]),
            _e(TypeError, "lr_schedule", lr_schedule={"0": 1.0}),
            _e(TypeError, "lr_schedule", lr_schedule={1.5: 1.0}),
            _e(TypeError, "lr_schedule", lr_schedule={True: 1.0}),
            _e(ValueError, "lr_schedule", lr_schedule={-5: 1.0}),
            _e(ValueError, "lr_schedule", lr_schedule={5: -1.0}),
            _e(ValueError, "lr_schedule", lr_schedule={5: math.nan}),
            _e(ValueError, "lr_schedule", lr_schedule={10: math.inf}),
        ),
    ),
    DerivationCase(
        "gradient_accumulation", D.extend_with_gradient_accumulation, dict(grad_accum_steps=3), accumulates=True,
        error_inputs=(
            _e(ValueError, "grad_accum_steps", grad_accum_steps=0),
            _e(TypeError, "grad_accum_steps", grad_accum_steps=2.5),
            _e(TypeError, "grad_accum_steps", grad_accum_steps=2.0),
            _e(TypeError, "grad_accum_steps", grad_accum_steps=True),
        ),
    ),
    DerivationCase(
        "lookahead", D.extend_with_lookahead, dict(steps_per_slow_update=3, slow_step_size=0.4), has_after_step=True,
        error_inputs=(
            _e(ValueError, "steps_per_slow_update", steps_per_slow_update=0),
            _e(TypeError, "steps_per_slow_update", steps_per_slow_update="5"),
            _e(ValueError, "slow_step_size", slow_step_size=0.0),
            _e(ValueError, "slow_step_size", slow_step_size=1.01),
            _e(ValueError, "slow_step_size", slow_step_size=1.5),
        ),
    ),
    DerivationCase(
        "lazy", D.extend_with_lazy_optimization, dict(include_in_lazy_optimization=["embeddings"]),
        needs_names=True, transforms_update=True,
        error_inputs=(
            _e(ValueError, "include_in_lazy_optimization", include_in_lazy_optimization=["(?P<x"]),
            _e(ValueError, "include_in_lazy_optimization", include_in_lazy_optimization=["(?P<"]),
        ),
    ),
    DerivationCase(
        "ema", D.extend_with_exponential_moving_average, dict(ema_momentum=0.8), has_after_step=True,
        error_inputs=(
            _e(ValueError, "ema_momentum", ema_momentum=1.0),
            _e(ValueError, "ema_momentum", ema_momentum=-0.5),
            _e(ValueError, "ema_momentum", ema_momentum=-0.1),
            _e(TypeError, "ema_momentum", ema_momentum="0.9"),
        ),
    ),
    DerivationCase(
        "paramwise_lr", D.extend_with_parameter_wise_lr, dict(paramwise_lr_schedule={"dense": 0.5, "kernel": 3.0}),
        needs_names=True, transforms_update=True,
        error_inputs=(
            _e(ValueError, "paramwise_lr_schedule", paramwise_lr_schedule={"dense": -1.0}),
            _e(ValueError, "paramwise_lr_schedule", paramwise_lr_schedule={"dense": -2.0}),
            _e(ValueError, "paramwise_lr_schedule", paramwise_lr_schedule={"dense": math.inf}),
            _e(ValueError, "paramwise_lr_schedule", paramwise_lr_schedule={"dense": math.nan}),
            _e(TypeError, "paramwise_lr_schedule", paramwise_lr_schedule={3: 1.0}),
            _e(TypeError, "paramwise_lr_schedule", paramwise_lr_schedule=["dense"]),
        ),
    ),
    DerivationCase(
        "clip", D.extend_with_gradient_clipping, dict(global_clipnorm=0.5),
        error_inputs=(
            _e(ValueError, "global_clipnorm", global_clipnorm=0.0),
            _e(ValueError, "global_clipnorm", global_clipnorm=math.inf),
            _e(ValueError, "clipnorm", clipnorm=-1.0),
            _e(TypeError, "clipvalue", clipvalue="1"),
            _e(ValueError, "global_clipnorm, clipvalue", global_clipnorm=1.0, clipvalue=1.0),
        ),
    ),
    DerivationCase(
        "schedule_free", D.extend_with_schedule_free, dict(schedule_free_momentum=0.8, average_power=0.5), has_after_step=True,
        error_inputs=(
            _e(ValueError, "schedule_free_momentum", schedule_free_momentum=1.0),
            _e(ValueError, "schedule_free_momentum", schedule_free_momentum=-0.5),
            _e(ValueError, "weight_lr_power", weight_lr_power=-1.0),
            _e(ValueError, "weight_lr_power", weight_lr_power=math.inf),
            _e(ValueError, "average_power", average_power=math.nan),
            _e(TypeError, "average_power", average_power="1"),
        ),
    ),
    DerivationCase(
        "skip_nonfinite", D.extend_with_skip_nonfinite, {},
        error_inputs=(
            _e(ValueError, "max_consecutive_skips", max_consecutive_skips=0),
            _e(TypeError, "max_consecutive_skips", max_consecutive_skips=2.0),
        ),
    ),
]
"""Every derivation (``danlu.derivations.ALL_DERIVATIONS``, ``danlu.factory.DERIVATION_NAMES``) has one row."""

DERIVATIONS: dict[str, DerivationCase] = {case.id: case for case in DERIVATION_CASES}
OPTIMIZERS: dict[str, OptimizerCase] = {case.id: case for case in OPTIMIZER_CASES + FOREIGN_CASES}


def derive(base: type, names: Sequence[str]) -> tuple[type, dict[str, Any]]:
    """``base`` extended by the named derivations (innermost first) and their keywords from the table."""
    cls, kwargs = base, {}
    for name in names:
        case = DERIVATIONS[name]
        cls = case.factory(cls)
        kwargs.update(case.kwargs)
    return cls, kwargs


def stack_case(base: str, names: Sequence[str], **overrides: Any) -> OptimizerCase:
    """A row for a derived stack: ``stack_case("torch.AdamW", ["gradient_accumulation", "ema"])``."""
    row = OPTIMIZERS[base]
    cls, kwargs = derive(row.cls, names)
    derivations = [DERIVATIONS[n] for n in names]
    return OptimizerCase(
        "+".join([row.spec or row.id, *names]),
        cls,
        {**row.kwargs, **kwargs, **overrides},
        holds=(*row.holds, *names),
        supports_complex=row.supports_complex,
        needs_names=row.needs_names or any(d.needs_names for d in derivations),
        factored=row.factored,
        has_foreach=row.has_foreach,
        native=row.native,
        tolerance=row.tolerance,
    )


def base_cases(rows: Iterable[OptimizerCase] = OPTIMIZER_CASES) -> list[OptimizerCase]:
    """The rows of classes that hold no derivation (``extend_with_X`` may be applied to them)."""
    return [case for case in rows if not case.holds]


def one_per_class(rows: Iterable[OptimizerCase] = OPTIMIZER_CASES) -> list[OptimizerCase]:
    """The first row of each class."""
    seen: set[type] = set()
    out = []
    for case in rows:
        if case.cls not in seen:
            seen.add(case.cls)
            out.append(case)
    return out


def case_ids(rows: Iterable[OptimizerCase | DerivationCase]) -> list[str]:
    return [case.id for case in rows]


def error_inputs(rows: Iterable[OptimizerCase] = OPTIMIZER_CASES) -> Iterator[tuple[type, ErrorInput]]:
    """Every class's refused constructor arguments: its rows' ``error_inputs``, then the lr checks."""
    rows = list(rows)
    for case in rows:
        for bad in case.error_inputs:
            yield case.cls, bad
    for case in one_per_class(rows):
        lr_may_be_none = any(row.cls is case.cls and "lr" in row.kwargs and row.kwargs["lr"] is None for row in rows)
        for value, error in ((-1e-3, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("1e-3", TypeError)):
            yield case.cls, ErrorInput({"lr": value}, error, "lr")
        if not lr_may_be_none:
            yield case.cls, ErrorInput({"lr": None}, TypeError, "lr")
        if issubclass(case.cls, danlu.DanluOptimizer):
            for bad in DANLU_ERROR_INPUTS:
                yield case.cls, bad


DANLU_ERROR_INPUTS: tuple[ErrorInput, ...] = (
    _e(TypeError, "foreach", foreach="no"),
    _e(ValueError, "state_dtype", state_dtype=torch.int64),
    _e(TypeError, "state_dtype", state_dtype="float32"),
    _e(TypeError, "stochastic_rounding", stochastic_rounding="yes"),
)
"""Options of every danlu optimizer (precision and foreach) that must be refused."""


# ------------------------------------------------------------------------------ parameters and runs
SHAPES: dict[str, tuple[int, ...]] = {
    "embeddings": (9, 5),
    "dense.kernel": (6, 7),
    "dense.bias": (7,),
    "LayerNorm.gamma": (7,),
    "attn.kernel": (3, 6, 5),
    "scalar": (),
}


def named_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (name, torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)))
        for name, shape in SHAPES.items()
    ]


def gradients(params: list[tuple[str, torch.Tensor]], steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """Gradient sequences; the embedding has all-zero rows (so lazy updates show)."""
    generator = torch.Generator().manual_seed(seed)
    sequence = []
    for _ in range(steps):
        grads = []
        for name, p in params:
            g = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            if name == "embeddings":
                g[torch.randperm(p.shape[0], generator=generator)[:4]] = 0
            grads.append(g.to(p.dtype))
        sequence.append(grads)
    return sequence


def run(opt: torch.optim.Optimizer, params: list[tuple[str, torch.Tensor]], grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    for step_grads in grads:
        for (_, p), g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for _, p in params]


__all__ = [
    "DERIVATIONS",
    "DERIVATION_CASES",
    "FOREIGN_CASES",
    "OPTIMIZERS",
    "OPTIMIZER_CASES",
    "SHAPES",
    "DerivationCase",
    "ErrorInput",
    "OptimizerCase",
    "TorchReference",
    "base_cases",
    "derivation_error_inputs",
    "derive",
    "error_inputs",
    "gradients",
    "case_ids",
    "named_params",
    "one_per_class",
    "run",
    "stack_case",
]
