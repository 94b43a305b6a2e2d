"""Schedule-Free (``extend_with_schedule_free``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from danlu._distributed import foreach_copy_
from danlu._native_spec import Surrounds
from danlu._validate import check_number
from danlu.derivations._base import APPLIED_STEPS, Derivation, by_device_and_dtype, wide_dtype
from danlu.derivations.lookahead import Lookahead

if TYPE_CHECKING:
    from danlu._context import StepContext
    from danlu._host import DerivationHost

__all__ = ["ScheduleFree", "ScheduleFreeModeError"]

Z = "schedule_free.z"
X = "schedule_free.x"
EVAL = "schedule_free_eval"
"""Param-group key: true while ``eval()`` has put the averaged weights x into the parameters."""
LR_MAX = "schedule_free_lr_max"
WEIGHT_SUM = "schedule_free_weight_sum"
_STEP_LRS = "_danlu_schedule_free_lrs"
_PLAIN = (Tensor, torch.nn.Parameter)


class ScheduleFreeModeError(ValueError, RuntimeError):
    """``step()`` while the optimizer is in eval mode (the parameters hold the averaged weights x).

    A ``ValueError`` (a bad call, like danlu's other bad inputs) and a ``RuntimeError`` (the
    optimizer is in the wrong mode for it), so that either ``except`` catches it. Nothing changes.
    """


class ScheduleFree(Derivation):
    r"""Schedule-Free (Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, 2024), in the wrapper form of the ``schedulefree`` package.

    The base optimizer steps the sequence :math:`z`; :math:`x` is a weighted average of the
    :math:`z`; the gradient is taken at their interpolation :math:`y`, which the parameters hold in
    training. After the :math:`t`-th applied step, with :math:`\eta_t` the step's effective lr:

    .. math::

        z_t = \mathrm{base}(z_{t-1}, \nabla f(y_{t-1})), \qquad
        \eta_{\max} = \max_{s \le t} \eta_s, \qquad w_t = t^{r}\, \eta_{\max}^{p}, \qquad
        c_t = \frac{w_t}{\sum_{s \le t} w_s},

        x_t = (1 - c_t)\, x_{t-1} + c_t\, z_t, \qquad
        y_t = \beta\, x_t + (1 - \beta)\, z_t

    with :math:`\beta` = ``schedule_free_momentum``, :math:`p` = ``weight_lr_power`` and :math:`r` =
    ``average_power``; :math:`x_0 = z_0 = y_0` are the parameters. ``optimizer.eval()`` puts
    :math:`x` into the parameters (for evaluation and saving), ``optimizer.train()`` puts :math:`y`
    back; ``step()`` in eval mode raises :class:`ScheduleFreeModeError`. The optimizer starts in
    train mode (the package's wrappers start in eval mode and need a ``train()`` first; before the
    first step both modes hold the same weights). The mode is saved in ``state_dict``.

    Under ``torch.compile`` the group entries ``schedule_free_lr_max`` and ``schedule_free_weight_sum``
    (Python floats in eager steps) are 0-dim float64 tensors computed with tensor ops; the mode stays
    a Python bool, which ``eval()`` and ``train()`` between steps leave as the compiled step saw it.

    State: :math:`z` and :math:`x` (``state[p]["schedule_free.z"]``, ``["schedule_free.x"]``), two
    parameter-sized tensors, float32 for 16-bit parameters; :math:`y` is the parameter itself. The
    base never sees them. Put Lookahead inside (``"adam+lookahead+schedule_free"``: it acts on
    :math:`z`); over Schedule-Free it would act on :math:`y`, which the next step overwrites, so
    that stack is refused when its class is built.

    Keyword arguments: ``schedule_free_momentum=0.9`` (in [0, 1)), ``weight_lr_power=2.0`` and
    ``average_power=0.0`` (finite, >= 0).

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = danlu.extend_with_schedule_free(danlu.SGD)([w], lr=1.0, schedule_free_momentum=0.5)
        >>> w.grad = torch.ones(1); _ = opt.step()   # z = -1, x = z (first weight is all of it), y = x
        >>> w.grad = torch.ones(1); _ = opt.step()   # z = -2, x = (-1 - 2) / 2, y = (x + z) / 2
        >>> w.item()
        -1.75
        >>> opt.eval(); w.item()
        -1.5
        >>> opt.train(); w.item()
        -1.75
    """

    name = "schedule_free"
    title = "ScheduleFree"
    defaults = {"schedule_free_momentum": 0.9, "weight_lr_power": 2.0, "average_power": 0.0}
    state_keys = (Z, X)
    required_state = (Z, X)
    counters = (EVAL, LR_MAX, WEIGHT_SUM)
    counter_starts = {EVAL: False}
    """A bool from the start: a traced step guards on the flag's type and value (an int 0 would cost a recompile)."""
    native = Surrounds()
    """The base's step runs on the native kernels; z goes in before the pass and y comes out after it. A
    Lookahead or EMA inside fuses into the pass (it acts on z); an EMA outside runs after, on y."""

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        checked: dict[str, Any] = {}
        if "schedule_free_momentum" in options:
            checked["schedule_free_momentum"] = check_number(
                "schedule_free_momentum", options["schedule_free_momentum"], low=0.0, high=1.0, high_open=True
            )
        for key in ("weight_lr_power", "average_power"):
            if key in options:
                checked[key] = check_number(key, options[key], low=0.0)
        if EVAL in options:  # a saved group: the flag as a bool (an int 0 in state dicts saved before any train() or eval())
            checked[EVAL] = bool(options[EVAL])
        return checked

    def check_outer(self, outer: Derivation) -> None:
        if isinstance(outer, Lookahead):
            raise ValueError(
                "extend_with_lookahead over extend_with_schedule_free: Lookahead would act on y, which the next step "
                "replaces; apply Lookahead inside Schedule-Free (create_optimizer('adam+lookahead+schedule_free'))"
            )

    def check(self, host: DerivationHost) -> None:
        if any(group[EVAL] for group in host.param_groups):
            raise ScheduleFreeModeError(
                "step() in eval mode: the parameters hold the averaged weights x; call optimizer.train() before training"
            )

    def init_state(self, host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        for p in params:
            _ensure_state(host, group, p)

    def prepare(self, host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        """Record the step's lr and put z into the parameters: the base optimizer steps z."""
        lr: Any
        if torch.compiler.is_compiling():
            lr = _traced_lr(host, group)
        else:
            lr = _as_float(group.get("lr"))
            lr *= math.prod(d.lr_multiplier(group) for d in host._danlu_derivations) * float(group.get("d", 1.0))
        host.__dict__.setdefault(_STEP_LRS, {})[id(group)] = lr
        tracked = [p for p in params if p.grad is not None or Z in host.state.get(p, {})]
        for p in tracked:
            _ensure_state(host, group, p)
        _copy(tracked, [host.state[p][Z] for p in tracked])

    def after_step(self, host: DerivationHost, group: dict[str, Any], params: list[Tensor]) -> None:
        lr = host.__dict__.get(_STEP_LRS, {}).pop(id(group), 0.0)
        tracked = [p for p in params if Z in host.state.get(p, {})]
        zs = [host.state[p][Z] for p in tracked]
        xs = [host.state[p][X] for p in tracked]
        _copy(zs, tracked)
        if torch.compiler.is_compiling():
            traced_weight = _traced_average_weight(group, lr)
            for x, z in zip(xs, zs):
                x.lerp_(z, traced_weight.to(x.dtype))
        else:
            average_weight = _average_weight(group, lr)
            for bucket in by_device_and_dtype(xs):
                torch._foreach_lerp_([xs[i] for i in bucket], [zs[i] for i in bucket], average_weight)
        _put_y(tracked, xs, zs, group["schedule_free_momentum"])

    def accumulate(self, host: DerivationHost, ctx: StepContext) -> bool:
        """Never withholds a step; registers what a step that fails after :meth:`prepare` must undo."""
        ctx.cleanup.append(lambda failed: self._finish(host, failed))
        return True

    def _finish(self, host: DerivationHost, failed: bool) -> None:
        host.__dict__.pop(_STEP_LRS, None)
        if failed:  # the parameters may hold z: put y back
            for group in host.param_groups:
                _restore_y(host, group)


def _ensure_state(host: DerivationHost, group: Mapping[str, Any], p: Tensor) -> None:
    state = host.state[p]
    if Z not in state:
        dtype = wide_dtype(group, p)
        state[Z] = p.detach().to(dtype=dtype, memory_format=torch.preserve_format, copy=True)
        state[X] = p.detach().to(dtype=dtype, memory_format=torch.preserve_format, copy=True)


def _average_weight(group: dict[str, Any], lr: float) -> float:
    """Update the group's ``lr_max`` and ``weight_sum`` (Python floats) and return the step's weight of z in x."""
    group[LR_MAX] = lr_max = max(lr, float(group[LR_MAX]))  # float(): a 0-dim tensor of a traced run's state dict
    weight = int(group[APPLIED_STEPS]) ** group["average_power"] * lr_max ** group["weight_lr_power"]
    group[WEIGHT_SUM] = weight_sum = float(group[WEIGHT_SUM]) + weight
    return weight / weight_sum if weight_sum > 0 else 0.0


def _traced_lr(host: DerivationHost, group: Mapping[str, Any]) -> Tensor:
    """The step's effective lr as a 0-dim float64 tensor, as the eager step computes it (no ``.item()``, no ``float()``).

    ``float()`` of the lr that dynamo makes a graph input (a changing Python float) would tie the
    graph to its value; the lr multipliers are 0-dim tensors or floats.
    """
    lr = group.get("lr")
    one = torch.ones((), dtype=torch.float64)
    base = one if lr is None else one * lr
    factor: Any = 1.0
    for derivation in host._danlu_derivations:
        factor = factor * derivation.lr_multiplier(group)
    return base * (factor * group.get("d", 1.0))


def _traced_average_weight(group: dict[str, Any], lr: Tensor) -> Tensor:
    """Update the group's ``lr_max`` and ``weight_sum`` (0-dim float64 tensors) and return the step's weight of z in x."""
    lr_max = torch.maximum(_as_tensor(group[LR_MAX]), lr)
    weight = group[APPLIED_STEPS].to(torch.float64) ** group["average_power"] * lr_max ** group["weight_lr_power"]
    weight_sum = _as_tensor(group[WEIGHT_SUM]) + weight
    group[LR_MAX], group[WEIGHT_SUM] = lr_max, weight_sum
    return torch.where(weight_sum > 0, weight / weight_sum, 0.0)


def _as_tensor(value: Any) -> Tensor:
    """A group counter as a 0-dim float64 tensor (a Python number in a state dict of an eager run)."""
    if isinstance(value, Tensor):
        return value.to(torch.float64)
    return torch.tensor(float(value), dtype=torch.float64)


def _as_float(lr: Any) -> float:
    if lr is None:
        return 1.0  # Adafactor's relative step: every step weighs the same
    return float(lr.item()) if isinstance(lr, Tensor) else float(lr)


def _copy(dst: list[Tensor], src: list[Tensor]) -> None:
    same = [i for i, (d, s) in enumerate(zip(dst, src)) if d.dtype == s.dtype]
    foreach_copy_([dst[i] for i in same], [src[i] for i in same])
    for i in sorted(set(range(len(dst))) - set(same)):
        dst[i].copy_(src[i])


def _restore_y(host: DerivationHost, group: Mapping[str, Any]) -> None:
    """Put y, from the group's saved x and z, into every tracked parameter of ``group``."""
    tracked = [p for p in group["params"] if Z in host.state.get(p, {})]
    _put_y(tracked, [host.state[p][X] for p in tracked], [host.state[p][Z] for p in tracked], group["schedule_free_momentum"])


def _put_y(params: list[Tensor], xs: list[Tensor], zs: list[Tensor], momentum: float) -> None:
    """``p = lerp(x, z, 1 - momentum)``, computed in the state's dtype and rounded once into the parameter.

    A plain CPU parameter of the state's dtype takes one pass (``lerp(x, z, out=p)``: 3 transfers, where a
    copy and an in-place lerp move 5; the same numbers); a traced step, DTensors and CUDA tensors take
    the foreach pair.
    """
    weight = 1 - momentum
    direct = not torch.compiler.is_compiling()
    paired: list[int] = []
    for i, (p, x, z) in enumerate(zip(params, xs, zs)):
        if p.dtype != x.dtype:
            p.copy_(torch.lerp(x, z, weight))
        elif direct and p.device.type == "cpu" and type(p) in _PLAIN and type(x) in _PLAIN and type(z) in _PLAIN:
            torch.lerp(x, z, weight, out=p)
        else:
            paired.append(i)
    chosen = [params[i] for i in paired]
    foreach_copy_(chosen, [xs[i] for i in paired])
    for bucket in by_device_and_dtype(chosen):
        torch._foreach_lerp_([chosen[i] for i in bucket], [zs[paired[i]] for i in bucket], weight)


def train(self: DerivationHost) -> None:
    """Training mode: the parameters hold y, where gradients are taken (the mode a new optimizer starts in)."""
    with torch.no_grad():
        for group in self.param_groups:
            if group[EVAL]:
                _restore_y(self, group)
            group[EVAL] = False


def eval(self: DerivationHost) -> None:
    """Evaluation mode: the parameters hold the averaged weights x (evaluate, save the model; ``train()`` to go on)."""
    with torch.no_grad():
        for group in self.param_groups:
            if not group[EVAL]:
                tracked = [p for p in group["params"] if Z in self.state.get(p, {})]
                _copy(tracked, [self.state[p][X] for p in tracked])
            group[EVAL] = True


ScheduleFree.methods = {"train": train, "eval": eval}
