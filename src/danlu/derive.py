"""The ``extend_with_*`` class factories.

``extend_with_X(Base)`` returns a subclass of ``Base`` whose ``step`` runs the derivation hooks
around Base's update (see :mod:`danlu._host`). On danlu's own optimizers the transforms act on the
update before it is written, with no parameter copy. On any other ``torch.optim.Optimizer``
subclass the class also inherits :class:`ForeignHost`, which runs Base's own ``step`` and applies
the transforms to ``p_new - p_old`` of only the parameters some transform selects.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, cast

import torch
from torch import Tensor

from danlu._context import StepContext
from danlu._distributed import foreach_copy_
from danlu._host import DerivationHost
from danlu._params import normalize_params
from danlu.derivations import (
    ALL_DERIVATIONS,
    Derivation,
    ExponentialMovingAverage,
    GradientAccumulation,
    GradientClipping,
    LayerAdaptation,
    LazyOptimization,
    Lookahead,
    ParameterWiseLR,
    PiecewiseLinearLR,
    ScheduleFree,
    SkipNonfinite,
    WeightDecay,
)
from danlu.derivations._base import matches_any

__all__ = [
    "ForeignHost",
    "extend_with",
    "extend_with_weight_decay",
    "extend_with_layer_adaptation",
    "extend_with_piecewise_linear_lr",
    "extend_with_gradient_accumulation",
    "extend_with_lookahead",
    "extend_with_lazy_optimization",
    "extend_with_exponential_moving_average",
    "extend_with_parameter_wise_lr",
    "extend_with_skip_nonfinite",
    "extend_with_gradient_clipping",
    "extend_with_schedule_free",
]


class ForeignHost(DerivationHost):
    """The derivation step for a base that is not a danlu optimizer: snapshot, base ``step()``, transform.

    Example:
        >>> import torch, danlu
        >>> issubclass(danlu.extend_with_lookahead(torch.optim.SGD), danlu.derive.ForeignHost)
        True
    """

    _danlu_base_step: Callable[..., Any]
    """The base's ``step`` without torch's hook wrapper (set on each derived class, see :func:`_unhooked_base_step`)."""
    _danlu_traced_base_step: Callable[..., Any]
    """The same without any wrapper (torch.optim's ``_use_grad`` graph breaks included): the traced step calls it."""
    _danlu_init_group_lists: ClassVar[int | None] = None
    """How many empty lists the traced step hands the base's ``_init_group`` (see :meth:`_traced_step`); None: no call."""
    _danlu_eager_first_step: ClassVar[bool] = False
    """The base has an ``_init_group`` that cannot be called so: the call that creates its state runs eagerly."""

    def _base_step(self, ctx: StepContext) -> None:
        groups = self.param_groups
        saved_lrs = [group["lr"] for group in groups]
        snapshots: list[tuple[list[int], list[Tensor]]] = []
        written = _write_gradients(ctx) if torch.compiler.is_compiling() else None
        swapped = _swap_gradients(ctx) if written is None else []
        try:
            for group, scale in zip(groups, ctx.lr_scales):
                if isinstance(scale, Tensor) or scale != 1.0:
                    group["lr"] = group["lr"] * scale
            if self._has_transforms():
                snapshots = [self._snapshot(group) for group in groups]
            effective_lrs = [_as_float(group["lr"]) for group in groups]
            self._step_foreign_base()
        except BaseException:
            for group, (indices, olds) in zip(groups, snapshots):
                foreach_copy_([group["params"][i] for i in indices], olds)
            raise
        finally:
            for group, lr in zip(groups, saved_lrs):
                group["lr"] = lr
            for p, grad in swapped:
                p.grad = grad
            for target, old in written or ():
                target.copy_(old)
        for group, snapshot, lr in zip(groups, snapshots, effective_lrs):
            self._transform_snapshot(ctx, group, snapshot, lr)

    def _needs_eager_call(self) -> bool:
        """Under tracing, whether this call takes an eager step (one more graph break): almost never.

        Only a base with an ``_init_group`` that :meth:`_traced_step` cannot call (a keyword-only
        argument without default) does so, for a call with a parameter that has no base state yet:
        Dynamo would run that ``_init_group`` on the real state, apart from the traced step's changes.
        """
        if not self._danlu_eager_first_step:
            return False
        keys = {key for d in self._danlu_derivations for key in d.state_keys}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not set(self.state.get(p, {})) - keys:
                    return True
        return False

    def _traced_step(self) -> None:
        """The traced step, after the base's ``_init_group`` has made the state of every parameter with a gradient.

        Dynamo does not trace an optimizer's ``_init_group``: it runs it on the real state while it
        traces (torch/_dynamo/variables/optimizer.py). Called inside the base's step, after the
        derivations have added their entries to the traced state, it would make the base's state
        apart from them, and the traced step's own changes would then overwrite it. Called here,
        before anything reads the state, it leaves the traced step nothing of the base's to create.
        Nothing else happens: the lists it fills are dropped, no ``step`` count moves. It is one call
        for every group: Dynamo reads the state after the first one, so a second would again make
        state apart from the traced one.
        """
        if self._danlu_init_group_lists is not None:
            self._init_group(_EVERY_GROUP)
        super()._traced_step()

    def _init_group(self, *args: Any, **kwargs: Any) -> Any:
        """The base's ``_init_group``; under tracing, a state that holds only derivation entries is shown empty to it.

        (An accumulation buffer of an eager call that only buffered must not look like the base's state.)
        Given ``_EVERY_GROUP``, it runs for every group, with empty lists.
        """
        base_init = super()._init_group  # type: ignore[misc]
        if args and isinstance(args[0], str) and args[0] == _EVERY_GROUP:
            lists = self._danlu_init_group_lists or 0
            for group in self.param_groups:
                self._init_group(group, *[[] for _ in range(lists)])
            return None
        if not torch.compiler.is_compiling():
            return base_init(*args, **kwargs)  # the eager step has set the entries aside already
        keys = {key for d in self._danlu_derivations for key in d.state_keys}
        bare = [state for state in self.state.values() if state and set(state) <= keys]
        with _derivation_state_hidden(self, bare):
            return base_init(*args, **kwargs)

    def _init_base_state(self) -> None:
        self._step_foreign_base()  # lr 0 and zero gradients: what torch.distributed.checkpoint does for any optimizer

    def _step_foreign_base(self) -> None:
        """Run Base.step() with the derivations' state entries out of its sight.

        Many optimizers initialize a parameter's state when ``len(state) == 0``; the derivations'
        namespaced entries are set aside for the call and put back after it.
        """
        if torch.compiler.is_compiling():
            # the base function runs without any of torch.optim's wrappers, whose deliberate graph
            # breaks would cut the traced step in three
            if self._danlu_init_group_lists is not None or self._danlu_eager_first_step:
                self._danlu_traced_base_step(self)  # its state exists (see _traced_step): nothing is set aside
                return
            with _derivation_state_hidden(self, self.state.values()):  # traced too: a base that makes its state itself
                self._danlu_traced_base_step(self)
            return
        with _derivation_state_hidden(self, self.state.values()):
            self._danlu_base_step(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's __setstate__ of Adam and friends reads state["step"] of every non-empty entry (deepcopy, pickle)
        with _derivation_state_hidden(self, state.get("state", {}).values()):
            super().__setstate__(state)

    def _snapshot(self, group: dict[str, Any]) -> tuple[list[int], list[Tensor]]:
        names = self._names(group)
        indices = [
            i
            for i, (p, name) in enumerate(zip(group["params"], names))
            if p.grad is not None and self._selected_by_any(group, name)
        ]
        return indices, [group["params"][i].detach().clone(memory_format=torch.preserve_format) for i in indices]

    def _transform_snapshot(self, ctx: StepContext, group: dict[str, Any], snapshot: tuple[list[int], list[Tensor]], lr: float) -> None:
        indices, olds = snapshot
        if not indices:
            return
        params = [group["params"][i] for i in indices]
        names = self._names(group)
        torch._foreach_sub_(params, olds)
        grads = cast(list[Tensor], [ctx.scaled_gradient(p) for p in params])  # selected because they have one
        self._apply_transforms(group, olds, params, grads, [names[i] for i in indices], [lr] * len(params))
        torch._foreach_add_(params, olds)


_EVERY_GROUP = "danlu: every group"
"""The argument of ForeignHost's ``_init_group`` that makes the base's state of every group (a constant to Dynamo)."""

_HOOK_WRAPPER_CODE = torch.optim.Optimizer.profile_hook_step(lambda *args, **kwargs: None).__code__
"""The code of torch's hook wrapper: a ``step`` with this code is torch's wrapper, whatever else wraps it."""


def _unhooked_base_step(cls: type) -> Callable[..., Any]:
    """The base optimizer's ``step`` without torch's hook wrapper.

    ``torch.optim.Optimizer`` wraps a class's ``step`` with its hook machinery (step pre- and post-hooks,
    the profiler record) at the first instantiation of that class. The derived class's own ``step`` is
    wrapped the same way; calling the base's wrapped ``step`` from inside it would run every hook twice,
    the inner time before Lookahead or EMA have run.
    """
    mro = cls.__mro__
    for klass in mro[mro.index(DerivationHost) + 1 :]:
        step = klass.__dict__.get("step")
        if step is not None:
            while getattr(step, "__code__", None) is _HOOK_WRAPPER_CODE:
                step = step.__wrapped__
            return step
    raise TypeError(f"{cls.__name__} has no base step")  # unreachable: torch.optim.Optimizer defines step


def _bind_foreign_base(cls: type, base: type) -> None:
    """Set on ``cls`` what its traced step reads of the base: found here, not while tracing (a class's ``__dict__`` breaks the graph)."""
    step = _unhooked_base_step(cls)
    cls._danlu_base_step = staticmethod(step)  # type: ignore[attr-defined]
    cls._danlu_traced_base_step = staticmethod(inspect.unwrap(step))  # type: ignore[attr-defined]
    lists = _init_group_lists(base)
    cls._danlu_init_group_lists = lists  # type: ignore[attr-defined]
    cls._danlu_eager_first_step = lists is None and callable(getattr(base, "_init_group", None))  # type: ignore[attr-defined]


def _init_group_lists(base: type) -> int | None:
    """How many arguments after ``group`` ``base._init_group`` requires, where all are positional (torch.optim's: lists).

    None where the base has no ``_init_group`` or one that cannot be called with ``group`` and lists.
    """
    init = getattr(base, "_init_group", None)
    if not callable(init):
        return None
    try:
        params = list(inspect.signature(init).parameters.values())
    except (TypeError, ValueError):
        return None
    required = [p for p in params[2:] if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(params) < 2 or any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params[:2] + required):
        return None
    return len(required)


@contextlib.contextmanager
def _derivation_state_hidden(host: DerivationHost, states: Iterable[dict[str, Any]]) -> Iterator[None]:
    """Set the derivations' namespaced entries of ``states`` aside for the block, and put them back after it."""
    keys = tuple(dict.fromkeys(key for d in host._danlu_derivations for key in d.state_keys))  # one order on every process
    hidden: list[tuple[dict[str, Any], dict[str, Any]]] = []
    if keys:
        for state in states:
            entries = {k: state.pop(k) for k in keys if k in state}
            if entries:
                hidden.append((state, entries))
    try:
        yield
    finally:
        for state, entries in hidden:
            state.update(entries)


def _swap_gradients(ctx: StepContext) -> list[tuple[Tensor, Tensor | None]]:
    """Point ``p.grad`` at the gradient of this step where a derivation replaced or scaled it; return what to put back.

    A foreign base reads ``p.grad``; the caller's tensor is set aside, never written.
    """
    swapped: list[tuple[Tensor, Tensor | None]] = []
    for _, p in ctx.params_with_gradient():
        if id(p) not in ctx.replaced and id(p) not in ctx.scales:
            continue
        grad = ctx.scaled_gradient(p)
        assert grad is not None
        swapped.append((p, p.grad))
        p.grad = grad if grad.dtype == p.dtype else grad.to(p.dtype)
    return swapped


def _write_gradients(ctx: StepContext) -> list[tuple[Tensor, Tensor]] | None:
    """Traced: write the gradient of this step into ``p.grad`` where a derivation replaced or scaled it; return what to write back.

    Setting ``p.grad`` would be a pending change of the parameter, at which Dynamo breaks the graph
    before the base's ``_init_group`` (which it runs on the real parameters). The caller's tensor
    gets its values back after the base step, inside the same graph. None where that cannot be
    done (a parameter without ``p.grad``, two parameters sharing one gradient tensor): the
    gradients are swapped then (:func:`_swap_gradients`), at the price of the break.
    """
    pairs: list[tuple[Tensor, Tensor]] = []
    targets: dict[tuple[Any, ...], list[Tensor]] = {}  # by shape and dtype: only tensors alike can be one
    for _, p in ctx.params_with_gradient():
        if id(p) not in ctx.replaced and id(p) not in ctx.scales:
            continue
        grad = ctx.scaled_gradient(p)
        target = p.grad
        if target is None or grad is None:
            return None
        alike = targets.setdefault((tuple(target.shape), target.dtype), [])
        if any(target is other for other in alike):  # identity, not id(): id() would tie the graph to this tensor
            return None
        alike.append(target)
        pairs.append((target, grad))
    pairs = [(target, _unaliased(grad, targets)) for target, grad in pairs]
    written = [(target, target.clone()) for target, _ in pairs]
    for target, grad in pairs:
        target.copy_(grad)
    return written


def _unaliased(grad: Tensor, targets: dict[tuple[Any, ...], list[Tensor]]) -> Tensor:
    """``grad``, or a copy of it where it is one of the tensors about to be written."""
    alike = targets.get((tuple(grad.shape), grad.dtype), [])
    return grad.clone() if any(grad is target for target in alike) else grad


def _as_float(lr: Any) -> Any:
    """The lr as a float (traced: a 0-dim float64 tensor, since a float would be a constant of the graph)."""
    if lr is None:
        return 0.0
    if torch.compiler.is_compiling():
        return torch.ones((), dtype=torch.float64) * lr
    return float(lr.item()) if isinstance(lr, Tensor) else float(lr)


def _derived_init(self: DerivationHost, params: Any, *args: Any, **kwargs: Any) -> None:
    cls = type(self)
    overrides: dict[str, Any] = {}
    for derivation in cls._danlu_derivations:
        given = {key: kwargs.pop(key) for key in derivation.defaults if key in kwargs}
        overrides.update(derivation.validate(given))
    self._danlu_overrides = overrides
    self._danlu_reports = {}
    cls._danlu_root.__init__(self, normalize_params(params), *args, **kwargs)  # type: ignore[attr-defined]
    for derivation in cls._danlu_derivations:
        for key, default in derivation.defaults.items():
            self.defaults[key] = overrides.get(key, default)
    _check_derived(self)


def _check_derived(opt: DerivationHost) -> None:
    """Checks that need the whole optimizer: names for name-based options, consistent counts, double decay."""
    groups = opt.param_groups
    all_names = [n for g in groups for n in g.get("param_names", ())]
    for derivation in opt._danlu_derivations:
        for group in groups:
            for option, patterns in derivation.patterns(group).items():
                if patterns and "param_names" not in group:
                    raise ValueError(
                        f"{option} matches parameter names, but this optimizer was built without names: "
                        "pass model.named_parameters() (or (name, tensor) pairs) as params"
                    )
                for pattern in patterns:
                    if not any(_pattern_matches(derivation, pattern, n) for n in all_names):
                        warnings.warn(f"{option}: pattern {pattern!r} matches no parameter name", UserWarning, stacklevel=4)
    if any(isinstance(d, GradientAccumulation) for d in opt._danlu_derivations):
        counts = {g["grad_accum_steps"] for g in groups}
        if len(counts) > 1:
            raise ValueError(f"grad_accum_steps must be the same in every parameter group, got {sorted(counts)}")
    if any(isinstance(d, WeightDecay) for d in opt._danlu_derivations):
        coupled = "weight_decay" in opt.defaults  # the base decays by itself (torch.optim.Adam's weight_decay)
        if coupled and any(g["weight_decay_rate"] > 0 and _positive(g.get("weight_decay")) for g in groups):
            warnings.warn(
                "the base optimizer has its own weight_decay > 0 and extend_with_weight_decay adds decoupled decay: "
                "the parameters are decayed twice",
                UserWarning,
                stacklevel=3,
            )


def _positive(value: Any) -> bool:
    try:
        return float(value) > 0
    except (TypeError, ValueError):
        return False


def _pattern_matches(derivation: Derivation, pattern: str, name: str) -> bool:
    if isinstance(derivation, ParameterWiseLR):
        return pattern in name
    return matches_any((pattern,), name)


def extend_with(base: type, derivation: Derivation, name: str | None = None) -> type:
    """Return a subclass of ``base`` (any ``torch.optim.Optimizer`` subclass) with ``derivation`` applied last.

    The class's ``__module__`` is the calling module (as for ``collections.namedtuple``): bound
    there to a module-level name equal to its ``__name__``, the class pickles by reference. Its
    instances pickle whole in any case: unpickling rebuilds the class from its base, derivation and name.

    Example:
        >>> import torch, danlu
        >>> from danlu.derivations import Derivation
        >>> class HalfLR(Derivation):   # a custom derivation: one hook
        ...     name, title = "half_lr", "HalfLR"
        ...     def lr_multiplier(self, group):
        ...         return 0.5
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = extend_with(torch.optim.SGD, HalfLR())([w], lr=1.0)
        >>> w.grad = torch.ones(1); _ = opt.step(); w.item()
        -0.5
    """
    return _extend(base, derivation, name, _caller_module())


def _caller_module() -> str:
    """The module that called the public function that called this one."""
    return str(sys._getframe(2).f_globals.get("__name__", "__main__"))


def _extend(base: type, derivation: Derivation, name: str | None, module: str) -> type:
    factory = f"extend_with_{derivation.name}"
    if not (isinstance(base, type) and issubclass(base, torch.optim.Optimizer)):
        raise TypeError(f"{factory}: expected a torch.optim.Optimizer subclass, got {base!r}")
    if name is not None and (not isinstance(name, str) or not name.isidentifier()):
        raise TypeError(f"{factory}: name must be a valid class name (str), got {name!r}")
    existing: tuple[Derivation, ...] = getattr(base, "_danlu_derivations", ())
    if any(type(d) is type(derivation) for d in existing):
        raise ValueError(f"{factory}: {base.__name__} already has the {derivation.name} derivation")
    for inner in existing:
        inner.check_outer(derivation)
    bases: tuple[type, ...] = (base,) if issubclass(base, DerivationHost) else (ForeignHost, base)
    namespace: dict[str, Any] = {
        "_danlu_derivations": existing + (derivation,),
        "_danlu_root": getattr(base, "_danlu_root", base),
        "_danlu_recipe": (base, derivation, name, module),
        "__init__": _derived_init,
        "__module__": module,
        "__doc__": f"{base.__name__} extended with {derivation.name}.\n\n{type(derivation).__doc__}",
    }
    namespace.update(derivation.methods)
    namespace.update({"__reduce_ex__": _reduce_derived, "__deepcopy__": _deepcopy_derived})
    cls_name = name or f"{base.__name__}With{derivation.title}"
    cls = type(cls_name, bases, namespace)
    cls.__qualname__ = cls_name
    if bases[0] is ForeignHost:
        _bind_foreign_base(cls, base)
    _REBUILT.setdefault((base, type(derivation), name, module), cls)
    return cls


# --------------------------------------------------------------------------------------- pickling
_REBUILT: weakref.WeakValueDictionary[tuple[Any, ...], type] = weakref.WeakValueDictionary()
"""Derived classes by (parent, derivation type, name, module): a rebuilt class is the live one if there is one."""

def _by_reference(cls: type) -> bool:
    """Whether pickle can find ``cls`` by its module and name (a ``__main__`` class does not count)."""
    module = sys.modules.get(cls.__module__)
    if module is None or cls.__module__ == "__main__":
        return False
    target: Any = module
    for part in cls.__qualname__.split("."):
        target = getattr(target, part, None)
    return target is cls


def _class_recipe(cls: type) -> Any:
    """``cls`` itself when pickle finds it by reference, else how extend_with builds it (recursively)."""
    recipe = cls.__dict__.get("_danlu_recipe")
    if recipe is None or _by_reference(cls):
        return cls
    parent, derivation, name, module = recipe
    return (_class_recipe(parent), derivation, name, module)


def _rebuild_class(recipe: Any) -> type:
    if isinstance(recipe, type):
        return recipe
    parent_recipe, derivation, name, module = recipe
    parent = _rebuild_class(parent_recipe)
    live = _REBUILT.get((parent, type(derivation), name, module))
    return live if live is not None else _extend(parent, derivation, name, module)


def _rebuild_instance(recipe: Any) -> DerivationHost:
    """Unpickling: the derived class from its recipe, and an empty instance that ``__setstate__`` fills."""
    cls = _rebuild_class(recipe)
    return cls.__new__(cls)


def _reduce_derived(self: DerivationHost, protocol: int) -> Any:
    """Pickle a derived optimizer whole: its class as (base, derivations, name), its state as torch does."""
    recipe = _class_recipe(type(self))
    if isinstance(recipe, type):
        return object.__reduce_ex__(self, protocol)
    return (_rebuild_instance, (recipe,), self.__getstate__())


def _deepcopy_derived(self: DerivationHost, memo: dict[int, Any]) -> DerivationHost:
    """A deep copy of the same class (pickling may rebuild the class; a copy in this process need not)."""
    clone = type(self).__new__(type(self))
    memo[id(self)] = clone
    clone.__setstate__(copy.deepcopy(self.__getstate__(), memo))
    return clone


def extend_with_weight_decay(BaseOptimizer: type, name: str | None = None) -> type:
    """Add decoupled weight decay: ``p_new = p_base_new - lr_t * weight_decay_rate * p_old``.

    Keyword arguments of the new class: ``weight_decay_rate=0.01``, ``exclude_from_weight_decay=()``
    (regular expressions of parameter names). See :class:`danlu.derivations.WeightDecay`.

    Example:
        >>> import torch, danlu
        >>> AdamW = danlu.extend_with_weight_decay(danlu.Adam)
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = AdamW(model.named_parameters(), lr=1e-3, weight_decay_rate=0.01, exclude_from_weight_decay=["bias"])
    """
    return _extend(BaseOptimizer, WeightDecay(), name, _caller_module())


def extend_with_layer_adaptation(BaseOptimizer: type, name: str | None = None) -> type:
    """Add LAMB's layer-wise trust ratio ``||p_old|| / ||d / max(lr_t, 1e-7)||`` on the update ``d``.

    Keyword arguments: ``exclude_from_layer_adaptation=()``. See :class:`danlu.derivations.LayerAdaptation`.

    Example:
        >>> import danlu
        >>> Lamb = danlu.extend_with_layer_adaptation(danlu.extend_with_weight_decay(danlu.Adam))
    """
    return _extend(BaseOptimizer, LayerAdaptation(), name, _caller_module())


def extend_with_piecewise_linear_lr(BaseOptimizer: type, name: str | None = None) -> type:
    """Multiply the lr by a piecewise-linear function of the applied steps (warm-up and decay).

    Keyword arguments: ``lr_schedule={0: 1}``. See :class:`danlu.derivations.PiecewiseLinearLR`.

    Example:
        >>> import torch, danlu
        >>> Warm = danlu.extend_with_piecewise_linear_lr(danlu.Adam)
        >>> opt = Warm([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, lr_schedule={1000: 1.0, 2000: 0.1})
    """
    return _extend(BaseOptimizer, PiecewiseLinearLR(), name, _caller_module())


def extend_with_gradient_accumulation(BaseOptimizer: type, name: str | None = None) -> type:
    """Apply one step every ``grad_accum_steps`` calls with the mean gradient (optax.MultiSteps semantics).

    Keyword arguments: ``grad_accum_steps=2``. See :class:`danlu.derivations.GradientAccumulation`.

    Example:
        >>> import torch, danlu
        >>> Accum = danlu.extend_with_gradient_accumulation(torch.optim.SGD)
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = Accum([w], lr=1.0, grad_accum_steps=2)
        >>> w.grad = torch.tensor([1.0]); _ = opt.step(); w.item()   # buffered
        0.0
        >>> w.grad = torch.tensor([3.0]); _ = opt.step(); w.item()   # mean gradient 2.0
        -2.0
    """
    return _extend(BaseOptimizer, GradientAccumulation(), name, _caller_module())


def extend_with_lookahead(BaseOptimizer: type, name: str | None = None) -> type:
    """Add Lookahead: after every k-th applied step, ``slow += alpha * (p - slow); p = slow``.

    Keyword arguments: ``steps_per_slow_update=5``, ``slow_step_size=0.5``. See
    :class:`danlu.derivations.Lookahead`.

    Example:
        >>> import torch, danlu
        >>> Ranger = danlu.extend_with_lookahead(danlu.RAdam)
        >>> opt = Ranger([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, steps_per_slow_update=6)
    """
    return _extend(BaseOptimizer, Lookahead(), name, _caller_module())


def extend_with_lazy_optimization(BaseOptimizer: type, name: str | None = None) -> type:
    """Leave unchanged the rows whose gradient is all zero, for the tensors named in ``include_in_lazy_optimization``.

    Keyword arguments: ``include_in_lazy_optimization=()``. See :class:`danlu.derivations.LazyOptimization`.

    Example:
        >>> import torch, danlu
        >>> Lazy = danlu.extend_with_lazy_optimization(danlu.Adam)
        >>> model = torch.nn.Embedding(10, 4)
        >>> opt = Lazy(model.named_parameters(), lr=1e-3, include_in_lazy_optimization=["weight"])
    """
    return _extend(BaseOptimizer, LazyOptimization(), name, _caller_module())


def extend_with_exponential_moving_average(BaseOptimizer: type, name: str | None = None) -> type:
    """Keep an EMA of the weights; ``apply_ema_weights()``, ``reset_old_weights()``, ``with opt.ema_weights():``.

    Keyword arguments: ``ema_momentum=0.999``. See :class:`danlu.derivations.ExponentialMovingAverage`.

    Example:
        >>> import torch, danlu
        >>> EMA = danlu.extend_with_exponential_moving_average(danlu.SGD)
        >>> w = torch.nn.Parameter(torch.tensor([1.0]))
        >>> opt = EMA([w], lr=0.5, ema_momentum=0.9)
        >>> w.grad = torch.tensor([1.0]); _ = opt.step()
        >>> with opt.ema_weights():   # bias-corrected average of one step: the weights themselves
        ...     round(w.item(), 4)
        0.5
        >>> w.item()
        0.5
    """
    return _extend(BaseOptimizer, ExponentialMovingAverage(), name, _caller_module())


def extend_with_parameter_wise_lr(BaseOptimizer: type, name: str | None = None) -> type:
    """Multiply each tensor's update by the values of the schedule keys that are substrings of its name.

    Keyword arguments: ``paramwise_lr_schedule={}``. See :class:`danlu.derivations.ParameterWiseLR`.

    Example:
        >>> import torch, danlu
        >>> Paramwise = danlu.extend_with_parameter_wise_lr(danlu.Adam)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> opt = Paramwise(model.named_parameters(), lr=1e-3, paramwise_lr_schedule={"0.": 0.1})
    """
    return _extend(BaseOptimizer, ParameterWiseLR(), name, _caller_module())


def extend_with_skip_nonfinite(BaseOptimizer: type, name: str | None = None) -> type:
    """Drop every call whose gradients contain inf or nan: nothing changes, ``nonfinite_skips`` counts it.

    Keyword arguments: ``max_consecutive_skips=None``. See :class:`danlu.derivations.SkipNonfinite`
    (not a bert4keras derivation: danlu's policy for non-finite gradients).

    Example:
        >>> import torch, danlu
        >>> Safe = danlu.extend_with_skip_nonfinite(danlu.AdamW)
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = Safe([w], lr=0.1)
        >>> w.grad = torch.tensor([1.0, float("nan")]); _ = opt.step()
        >>> w.detach(), opt.param_groups[0]["nonfinite_skips"], int(opt.param_groups[0]["applied_steps"])
        (tensor([1., 1.]), 1, 0)
    """
    return _extend(BaseOptimizer, SkipNonfinite(), name, _caller_module())


def extend_with_gradient_clipping(BaseOptimizer: type, name: str | None = None) -> type:
    """Clip the gradient each applied step uses: ``global_clipnorm``, ``clipnorm`` or ``clipvalue`` (Keras).

    Keyword arguments: ``global_clipnorm=None``, ``clipnorm=None``, ``clipvalue=None`` (exactly one).
    ``opt.grad_norm`` is the global norm before clipping of the last applied step. See
    :class:`danlu.derivations.GradientClipping`.

    Example:
        >>> import torch, danlu
        >>> Clipped = danlu.extend_with_gradient_clipping(danlu.AdamW)
        >>> w = torch.nn.Parameter(torch.zeros(3))
        >>> opt = Clipped([w], lr=1e-3, global_clipnorm=1.0)
        >>> w.grad = torch.full((3,), 10.0); _ = opt.step()
        >>> round(opt.grad_norm.item(), 3)
        17.321
    """
    return _extend(BaseOptimizer, GradientClipping(), name, _caller_module())


def extend_with_schedule_free(BaseOptimizer: type, name: str | None = None) -> type:
    """Make the base schedule-free (Defazio et al., 2024): it steps z, the parameters hold y, ``eval()`` puts in x.

    Keyword arguments: ``schedule_free_momentum=0.9``, ``weight_lr_power=2.0``, ``average_power=0.0``.
    Methods: ``train()``, ``eval()``. See :class:`danlu.derivations.ScheduleFree`.

    Example:
        >>> import torch, danlu
        >>> SFAdamW = danlu.extend_with_schedule_free(torch.optim.AdamW)
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = SFAdamW(model.parameters(), lr=1e-3, betas=(0.0, 0.999))
        >>> opt.eval()    # evaluate or save with the averaged weights
        >>> opt.train()   # back to training
    """
    return _extend(BaseOptimizer, ScheduleFree(), name, _caller_module())


assert {d.name for d in ALL_DERIVATIONS} == {
    WeightDecay.name,
    LayerAdaptation.name,
    PiecewiseLinearLR.name,
    GradientAccumulation.name,
    Lookahead.name,
    LazyOptimization.name,
    ExponentialMovingAverage.name,
    ParameterWiseLR.name,
    SkipNonfinite.name,
    GradientClipping.name,
    ScheduleFree.name,
}

