"""The skeleton of danlu's own optimizers.

A danlu optimizer describes its algorithm with four methods and inherits the
rest:

* ``_check_hyperparameters(options)``: validate one param group (or the
  constructor's defaults);
* ``_init_state(p, state, group)``: create the state of a parameter;
* ``_update_single(group, p, grad, state, lr, step)``: the update
  ``u = p_new - p_old`` of one tensor, written as plainly as the math. This is
  the oracle that the fast path is tested against;
* ``_update_foreach(group, params, grads, states, lrs, steps)``: the same
  updates for a list of tensors with ``torch._foreach_*`` kernels.

:meth:`DanluOptimizer._base_step` computes the updates chunk by chunk (so a
step never holds more than about one tensor's worth of temporaries), passes
them through the derivations' transforms and adds them to the parameters.
Nothing is copied that need not be.

State dtype policy: state tensors live on their parameter's device, in the
parameter's dtype for float32 and float64 parameters (as in ``torch.optim``) and
in float32 for bfloat16 and float16 parameters, whose updates are computed in
float32 and rounded once when written (16-bit moments underflow: Adam's
``(1 - beta2) * g**2`` and an ``eps`` of 1e-8 are zero in float16). Step
counters are float32 CPU scalars; ``load_state_dict`` keeps the saved dtypes.
The constructor keywords ``state_dtype`` (another dtype for the state and the
arithmetic) and ``stochastic_rounding`` (unbiased rounding of bfloat16 writes)
change this policy; see :mod:`danlu._precision`. Under FSDP2 the parameters,
gradients and state are DTensors; every reduction goes through
:mod:`danlu._distributed` so that it is taken over the whole tensor.
"""

from __future__ import annotations

import operator
from collections import defaultdict
from collections.abc import Iterable, Mapping
from itertools import chain, repeat
from typing import Any, ClassVar

import torch
from torch import Tensor

from danlu import _fused
from danlu._complex import as_real, reject_complex
from danlu._context import StepContext
from danlu._host import DerivationHost
from danlu._params import normalize_params
from danlu._precision import add_rounded_, check_state_dtype, compute_dtype
from danlu._validate import check_bool, check_number

__all__ = ["DanluOptimizer", "ParamsT"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]

CHUNK_MIN_NUMEL = 1 << 20
"""Updates are computed over chunks of at most max(largest tensor, this many) elements."""
_COMPLEX = frozenset({torch.complex32, torch.complex64, torch.complex128})
_DTYPE, _IS_SPARSE = operator.attrgetter("dtype"), operator.attrgetter("is_sparse")


class DanluOptimizer(DerivationHost):
    """Base class of danlu's optimizers (see the module docstring for the contract).

    Example:
        >>> import torch, danlu
        >>> isinstance(danlu.Adam([torch.nn.Parameter(torch.zeros(1))]), danlu.DanluOptimizer)
        True
    """

    supports_sparse: ClassVar[bool] = False
    supports_complex: ClassVar[bool] = False
    """Whether the algorithm takes complex parameters as (real, imaginary) pairs (see :mod:`danlu._complex`)."""

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        *,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        if foreach is not None:
            check_bool("foreach", foreach)
        check_state_dtype(state_dtype)
        check_bool("stochastic_rounding", stochastic_rounding)
        self._check_hyperparameters(defaults)
        precision = {"state_dtype": state_dtype, "stochastic_rounding": stochastic_rounding}
        super().__init__(normalize_params(params), {**defaults, "foreach": foreach, **precision})

    # ------------------------------------------------------------ algorithm
    def _check_hyperparameters(self, options: Mapping[str, Any]) -> None:
        check_number("lr", options["lr"], low=0.0)

    def _validate_group(self, group: dict[str, Any]) -> None:
        self._check_hyperparameters(group)
        check_state_dtype(group.get("state_dtype"))
        check_bool("stochastic_rounding", group.get("stochastic_rounding", False))

    def _init_state(self, p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
        """Create the algorithm's state for ``p`` (``state["step"]`` is created by the skeleton)."""

    def _update_single(
        self, group: Mapping[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, step: float
    ) -> Tensor:
        raise NotImplementedError

    def _update_foreach(
        self,
        group: Mapping[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lrs: list[float],
        steps: list[float],
    ) -> list[Tensor]:
        return [self._update_single(group, p, g, s, lr, t) for p, g, s, lr, t in zip(params, grads, states, lrs, steps)]

    def _effective_lr(self, group: Mapping[str, Any], state: Mapping[str, Any], step: Any) -> Any:
        """The learning rate of this step before any derivation's multiplier (traced: as the group holds it)."""
        return group["lr"] if isinstance(step, Tensor) else float(group["lr"])

    def _param_salt(self, p: Tensor) -> int:
        """A number that identifies ``p``'s place in the optimizer, the same in every run (stochastic rounding)."""
        cache: dict[int, int] = self.__dict__.setdefault("_danlu_salt_cache", {})
        if id(p) not in cache:
            for g, group in enumerate(self.param_groups):
                cache.update({id(q): (g << 24) + i for i, q in enumerate(group["params"])})
        return cache.get(id(p), 0)

    def _param_name(self, group: Mapping[str, Any], p: Tensor) -> str | None:
        """The name of ``p`` in ``group`` (None for an optimizer built without names)."""
        names = group.get("param_names")
        if names is None:
            return None
        cache: dict[int, str] = self.__dict__.setdefault("_danlu_name_cache", {})
        if id(p) not in cache:
            cache.update({id(q): n for q, n in zip(group["params"], names)})
        return cache.get(id(p))

    # ---------------------------------------------------------------- checks
    def _check_gradients(self) -> None:
        if self._gradients_plain():
            return
        if not self.supports_complex:
            reject_complex(self)
        if self.supports_sparse:
            return
        for group in self.param_groups:
            for name, p in zip(self._names(group), group["params"]):
                if p.grad is not None and p.grad.is_sparse:
                    label = f" (parameter {name!r})" if name else ""
                    raise ValueError(
                        f"{type(self).__name__} does not support sparse gradients{label}; "
                        "use LazyAdam, or an embedding with sparse=False"
                    )

    def _gradients_plain(self) -> bool:
        """Whether the gradients this eager step read pass :meth:`_check_gradients` (C-speed passes, no per-tensor Python).

        False when a parameter is complex or a gradient sparse (where the algorithm rejects them), and
        outside an eager step: then the per-tensor walk decides, and names the offending parameter.
        """
        grads = self._step_gradients()
        if grads is None:
            return False
        if not self.supports_complex:
            params = chain.from_iterable(group["params"] for group in self.param_groups)
            if not _COMPLEX.isdisjoint(map(_DTYPE, params)):
                return False
        if self.supports_sparse:
            return True
        flat = list(chain.from_iterable(grads))
        if not all(map(operator.is_not, flat, repeat(None))):
            flat = [g for g in flat if g is not None]
        return not any(map(_IS_SPARSE, flat))

    # ------------------------------------------------------------------ step
    def _base_step(self, ctx: StepContext) -> None:
        for group, scale in zip(self.param_groups, ctx.lr_scales):
            self._group_step(ctx, group, scale)

    def _defer_mean(self, ctx: StepContext, group: dict[str, Any], p: Tensor, buffer: Tensor, steps: int) -> bool:
        return _fused.defer_mean(self, ctx, group, p, buffer, steps)

    def _defer_group_means(self, ctx: StepContext, group: dict[str, Any], key: str, steps: int) -> bool:
        return _fused.defer_group_means(self, ctx, group, key, steps)

    def _init_missing_base_state(self, params: list[Tensor]) -> None:
        chosen = {id(p) for p in params}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in chosen and "step" not in self.state[p]:
                    self._init_param_state(p, group)

    def _init_param_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        compute = compute_dtype(p, group.get("state_dtype"))
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32)
        self._init_state(p if p.dtype == compute else p.detach().to(compute), state, group)
        return state

    def _init_base_state(self) -> None:
        """Create the state that the first step creates, without a step (see ``DerivationHost.step``)."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if p.grad is not None and "step" not in state:
                    compute = compute_dtype(p, group.get("state_dtype"))
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    self._init_state(p if p.dtype == compute else p.detach().to(compute), state, group)

    def _group_step(self, ctx: StepContext, group: dict[str, Any], scale: float) -> None:
        if _fused.steady_step(self, ctx, group, scale):
            return
        names_all = self._names(group)
        params, grads, states, names = [], [], [], []
        for p, name in zip(group["params"], names_all):
            grad = ctx.gradient(p)
            if grad is None:
                continue
            compute = compute_dtype(p, group.get("state_dtype"))
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                self._init_state(p if p.dtype == compute else p.detach().to(compute), state, group)
            params.append(p)
            grads.append(grad if grad.dtype == compute else grad.to(compute))
            states.append(state)
            names.append(name)
        if not params:
            return
        steps: list[Any]  # floats, or 0-dim tensors in a traced step
        lrs: list[Any]
        if torch.compiler.is_compiling():
            steps, lrs = _traced_steps_and_lrs(self, group, states, scale)
            rest = list(range(len(params)))  # the native kernels stay out of a traced graph
        else:
            steps = _fused.advance_steps(self, group, [s["step"] for s in states])
            lrs = [self._effective_lr(group, s, t) * scale for s, t in zip(states, steps)]
            rest = _fused.group_step(self, ctx, group, params, grads, states, names, lrs, steps)
        if not rest:
            return
        if len(rest) < len(params):
            params, grads, states = [params[i] for i in rest], [grads[i] for i in rest], [states[i] for i in rest]
            names, lrs, steps = [names[i] for i in rest], [lrs[i] for i in rest], [steps[i] for i in rest]
        grads = _fused.settle_gradients(ctx, params, grads)
        params, grads, states = as_real(params, grads, states)
        use_foreach = group.get("foreach") is not False
        for chunk in _chunks(params, grads, use_foreach):
            self._chunk_step(group, chunk, params, grads, states, names, lrs, steps)

    def _chunk_step(
        self,
        group: dict[str, Any],
        chunk: list[int],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        names: list[str | None],
        lrs: list[Any],
        steps: list[Any],
    ) -> None:
        c_params = [params[i] for i in chunk]
        c_grads = [grads[i] for i in chunk]
        c_states = [states[i] for i in chunk]
        c_lrs = [lrs[i] for i in chunk]
        c_steps = [steps[i] for i in chunk]
        if len(chunk) == 1 or group.get("foreach") is False:
            updates = [
                self._update_single(group, p, g, s, lr, t) for p, g, s, lr, t in zip(c_params, c_grads, c_states, c_lrs, c_steps)
            ]
        else:
            updates = list(self._update_foreach(group, c_params, c_grads, c_states, c_lrs, c_steps))
        if self._danlu_derivations:
            self._apply_transforms(group, c_params, updates, c_grads, [names[i] for i in chunk], c_lrs)
        if group.get("stochastic_rounding"):
            add_rounded_(c_params, updates, [self._param_salt(p) for p in c_params], c_steps)
        else:
            _add_updates(c_params, updates)


def _traced_steps_and_lrs(
    opt: DanluOptimizer, group: dict[str, Any], states: list[dict[str, Any]], scale: Any
) -> tuple[list[Tensor], list[Tensor]]:
    """Under tracing: advance the step counters and return them and the lrs as 0-dim float64 tensors.

    No ``.item()``: the per-step coefficients (bias corrections, schedules) become tensor ops of the
    step, and the lr (a Python float that dynamo turns into a graph input once it changes) is folded
    into a tensor, so that nothing the graph depends on is a constant of it.
    """
    counters = [s["step"] for s in states]
    torch._foreach_add_(counters, 1.0)
    steps = [t.to(torch.float64) for t in counters]
    one = torch.ones((), dtype=torch.float64)
    lrs = [one * opt._effective_lr(group, s, t) * scale for s, t in zip(states, steps)]
    return steps, lrs


def _add_updates(params: list[Tensor], updates: list[Tensor]) -> None:
    if all(u.dtype == p.dtype for p, u in zip(params, updates)):
        torch._foreach_add_(params, updates)
        return
    for p, u in zip(params, updates):
        p.add_(u)  # computed in u's (wider) dtype and rounded once; u.to(p.dtype) first would round twice


def _chunks(params: list[Tensor], grads: list[Tensor], use_foreach: bool) -> list[list[int]]:
    """Index lists of tensors that one foreach call handles: same device and dtype, dense, bounded size."""
    if not use_foreach:
        return [[i] for i in range(len(params))]
    buckets: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    chunks: list[list[int]] = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if g.is_sparse:
            chunks.append([i])
        else:
            buckets[(p.device, p.dtype, g.dtype)].append(i)
    for indices in buckets.values():
        budget = max(CHUNK_MIN_NUMEL, max(params[i].numel() for i in indices))
        current: list[int] = []
        size = 0
        for i in indices:
            n = params[i].numel()
            if current and size + n > budget:
                chunks.append(current)
                current, size = [], 0
            current.append(i)
            size += n
        if current:
            chunks.append(current)
    return chunks
