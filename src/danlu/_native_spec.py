"""How an algorithm or a derivation declares its native fast path (the neutral vocabulary of the driver).

Each optimizer file declares, next to its ``_update_single``, a class attribute ``native``: a
:class:`NativeSpec` (its kernel, the state keys in the kernel's state slots, and its coefficient row
as a function of ``(group, state, lr, step)``). Each derivation file declares a class attribute
``native``: one of the fusion kinds below. :mod:`danlu._fused` runs the kernels from these
declarations alone; it imports neither ``danlu.optimizers`` nor ``danlu.derivations``.

The integer names (kernels, slots, modes, phases, coefficient columns) are those of the enums at the
top of ``_kernels.cpp``; ``tests/test_native_driver.py`` checks that both sides agree.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from torch import Tensor

__all__ = [
    "Kernel",
    "Slot",
    "Mode",
    "Phase",
    "Col",
    "ALG_COLUMNS",
    "NativeSpec",
    "Layout",
    "Fold",
    "TrustRatio",
    "AfterStep",
    "AccumulationMean",
    "NoTensorWork",
    "Blocks",
    "Surrounds",
    "Fusion",
]


class Kernel(IntEnum):
    """The algorithm a kernel call runs (``alg`` of ``danlu_elementwise``)."""

    SGD = 0
    ADAGRAD = 1
    ADADELTA = 2
    RMSPROP = 3
    ADAM = 4
    NADAM = 5
    RADAM = 6
    LION = 7
    ADAMAX = 8
    ADAFACTOR = 9  # its own entry point, danlu_adafactor: a (rows, cols) shape per tensor


class Slot(IntEnum):
    """The pointer slots of one tensor's row (``NSLOT`` per tensor)."""

    PARAM = 0
    GRAD = 1
    STATE0 = 2
    STATE1 = 3
    STATE2 = 4
    ACCUM = 5  # the accumulation buffer (Adafactor: its momentum, as it never accumulates natively)
    SLOW = 6
    EMA = 7
    NSLOT = 8


class Mode(IntEnum):
    """Per-tensor bits of the work around the update."""

    ACCUM = 1  # g = (g + buffer) / k, buffer <- 0
    SYNC = 2  # Lookahead: slow <- lerp(slow, p, alpha), p <- slow
    EMA = 4  # shadow <- lerp(shadow, p, weight)
    EMA_FIRST = 8  # the EMA sees the parameter before Lookahead's sync


class Phase(IntEnum):
    """What a kernel call does: the whole step, the norms of layer adaptation only, or both passes."""

    FULL = 0
    NORM = 1
    ADAPT = 2


class Col(IntEnum):
    """The coefficient columns shared by every algorithm (``NCOEF`` per tensor; 0-9 are the algorithm's)."""

    A = 10  # d = A u + B p
    B = 11
    ACCUM_K = 12  # the accumulation's k
    SLOW_STEP = 13  # Lookahead's alpha
    EMA_WEIGHT = 14  # 1 - ema_momentum
    POST_A = 15  # layer adaptation: A <- r A POST_A
    POST_B = 16  # B <- r B POST_A + POST_B
    LR = 17  # the tensor's lr (layer adaptation's floor applies to it)
    GRAD_SCALE = 18  # the gradient used is g * GRAD_SCALE
    NCOEF = 20


ALG_COLUMNS = 10
"""Columns 0 .. ALG_COLUMNS - 1 of a row belong to the algorithm."""


@dataclass(frozen=True)
class Layout:
    """One tensor's place in a kernel that needs more than the elementwise slots (Adafactor).

    ``states`` go to slots STATE0, STATE1, STATE2, ACCUM (None: unused); ``keys`` are their state keys;
    ``shape`` is (rows, cols) or (numel, 0); ``columns`` overrides algorithm columns for this tensor.
    """

    keys: tuple[str | None, ...]
    states: tuple[Tensor | None, ...]
    shape: tuple[int, int]
    columns: Mapping[int, float]


@dataclass(frozen=True)
class NativeSpec:
    """How an optimizer's ``_update_single`` runs on the native kernels.

    Attributes:
        kernel: the kernel.
        state_keys: ``group -> keys`` of the state tensors in slots STATE0, STATE1, STATE2 (None: unused). A
            tensor whose state lacks one of them takes the generic path (Muon's matrices: the kernel is its Adam part's).
        coefficients: ``(group, state, lr, step) -> row`` of at most ALG_COLUMNS numbers. Called once per
            distinct ``(lr, step)`` of a group (the row must then not depend on the state) unless
            ``rows`` is given.
        rows: ``(group, states, lrs, steps) -> rows`` for all tensors at once, for algorithms whose row
            depends on per-tensor state that the step advances (NAdam's ``mu_product``).
        layout: ``(group, p, state, name) -> Layout | None`` for kernels with their own tensor layout;
            None refuses the tensor.
        accumulate: the kernel can form an accumulated mean in its pass.
        adapt: the kernel has the norm phase of layer adaptation.
        torch_fused: an ADAM kernel whose groups hold ``betas``, ``eps`` and ``bias_correction``: torch's fused
            AdamW may run it where the native kernels cannot (CUDA, no native library).
    """

    kernel: Kernel
    state_keys: Callable[[Mapping[str, Any]], Sequence[str | None]]
    coefficients: Callable[[Mapping[str, Any], Mapping[str, Any], float, float], Sequence[float]]
    rows: Callable[[Mapping[str, Any], list[dict[str, Any]], list[float], list[float]], Any] | None = None
    layout: Callable[[Mapping[str, Any], Tensor, dict[str, Any], str | None], Layout | None] | None = None
    accumulate: bool = True
    adapt: bool = True
    torch_fused: bool = False


class Fusion:
    """Base of the derivation declarations."""


@dataclass(frozen=True)
class Fold(Fusion):
    """A term folded into ``d = A u + B p``: for a selected tensor, ``d <- a d + b lr p`` with ``(a, b) = fold(group, name)``.

    Weight decay: ``(1, -rate)``; a parameter-wise lr ``m``: ``(m, 0)``.
    """

    fold: Callable[[Mapping[str, Any], str | None], tuple[float, float]]


@dataclass(frozen=True)
class TrustRatio(Fusion):
    """Layer adaptation: ``d <- r d`` with ``r = ||p|| / ||d / max(lr, min_lr)||`` (1 if either is 0); two passes."""

    min_lr: float


@dataclass(frozen=True)
class AfterStep(Fusion):
    """Work on the new parameter in the same pass, instead of ``after_step``.

    ``mode`` is SYNC or EMA; ``active(group)`` whether it acts in this step; ``weight(group)`` goes to
    ``column``; the tensor ``state[state_key]`` goes to ``slot`` (created as zeros when ``create``).
    """

    mode: Mode
    slot: Slot
    column: Col
    state_key: str
    weight: Callable[[Mapping[str, Any]], float]
    active: Callable[[Mapping[str, Any]], bool] = field(default=lambda group: True)
    create: bool = False


@dataclass(frozen=True)
class AccumulationMean(Fusion):
    """The applying call's mean is formed in the kernel's pass (``ctx.pending_means``)."""


@dataclass(frozen=True)
class NoTensorWork(Fusion):
    """Acts only through the lr multiplier, or by skipping whole calls: nothing to do per tensor."""


@dataclass(frozen=True)
class Blocks(Fusion):
    """The tensors this derivation ``selects`` take the generic path."""


@dataclass(frozen=True)
class Surrounds(Fusion):
    """Runs around the native pass, never in it: its ``prepare`` before and its ``after_step`` after, in stack order.

    For a derivation that changes what the parameters hold while the base steps (Schedule-Free puts z
    in, then y back). An :class:`AfterStep` declared inside it (earlier in the stack) still fuses into
    the pass and sees what the base stepped; one declared outside it (later) does not fuse: its
    ``after_step`` runs after this one's, on what this one leaves in the parameters.
    """
