"""Checks that a state dict fits an optimizer before anything is loaded.

``torch.optim.Optimizer.load_state_dict`` checks only the number of groups and of
parameters per group. danlu also refuses, with a ``ValueError`` that says what
does not fit, a state dict of another algorithm, of other derivations, of other
shapes, or with missing entries, and it keeps the dtypes of the saved state
(torch casts every floating-point state tensor to its parameter's dtype).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from danlu.derivations import ALL_DERIVATIONS
from danlu.derivations._base import APPLIED_STEPS

if TYPE_CHECKING:
    from danlu._host import DerivationHost

__all__ = ["check_state_dict", "keep_state_dtypes", "restore_derivation_state", "saved_params"]

_COUNTERS = (APPLIED_STEPS, "calls")


def saved_params(opt: DerivationHost, state_dict: Mapping[str, Any]) -> dict[Any, tuple[Tensor, dict[str, Any], str]]:
    """Map each saved parameter id to (parameter, its current group, a label for messages)."""
    mapping: dict[Any, tuple[Tensor, dict[str, Any], str]] = {}
    for g, (group, saved) in enumerate(zip(opt.param_groups, state_dict["param_groups"])):
        names = opt._names(group)
        for i, (saved_id, p) in enumerate(zip(saved["params"], group["params"])):
            label = repr(names[i]) if names[i] is not None else f"{i} of group {g}"
            mapping[saved_id] = (p, group, f"parameter {label}")
    return mapping


def normalize_loaded_groups(opt: DerivationHost, state_dict: Any) -> Any:
    """Undo what a trip through ``torch.distributed.checkpoint`` does to danlu's group options.

    DCP flattens nested dicts into paths, so the int steps of ``lr_schedule`` come back as strings,
    merged into the dict of the optimizer that the checkpoint is loaded into: ``{0: 1.0, '0': 0.5}``.
    The string keys are the saved ones: they are kept, as ints. Then every derivation option of every
    saved group is validated like a constructor argument (a ``ValueError`` or ``TypeError`` names it).
    Returns a shallow copy with new group dicts; ``state_dict`` itself is not changed.
    """
    if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("param_groups"), list):
        return state_dict
    groups = []
    for saved in state_dict["param_groups"]:
        if not isinstance(saved, Mapping):
            raise ValueError(f"state_dict['param_groups'] must hold dicts, got {type(saved).__name__}")
        group = dict(saved)
        for derivation in opt._danlu_derivations:
            for key, default in derivation.defaults.items():
                int_keyed = isinstance(default, Mapping) and default and all(isinstance(k, int) for k in default)
                if int_keyed and isinstance(group.get(key), Mapping):
                    group[key] = _int_keys(group[key])
            group.update(derivation.validate(group))
        groups.append(group)
    return {**state_dict, "param_groups": groups}


def _int_keys(mapping: Mapping[Any, Any]) -> dict[Any, Any]:
    """The saved (string, from DCP) int keys of a schedule if there are any, else the mapping as it is."""
    saved = {int(k): v for k, v in mapping.items() if isinstance(k, str) and k.isdigit()}
    return saved if saved else dict(mapping)


def check_state_dict(opt: DerivationHost, state_dict: Any) -> None:
    """Raise ``ValueError`` naming what does not fit; change nothing."""
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups', as returned by optimizer.state_dict()")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(opt.param_groups):
        raise ValueError(
            f"the state dict has {len(saved_groups)} parameter groups, this optimizer has {len(opt.param_groups)}"
        )
    for g, (group, saved) in enumerate(zip(opt.param_groups, saved_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"parameter group {g} has {len(saved['params'])} parameters in the state dict and {len(group['params'])} here"
            )
        _check_group_options(opt, g, saved)
    mapping = saved_params(opt, state_dict)
    for saved_id, entry in state_dict["state"].items():
        if saved_id not in mapping:
            raise ValueError(f"the state dict has state for parameter index {saved_id!r}, which no group lists")
        p, group, label = mapping[saved_id]
        saved_group = saved_groups[next(i for i, g in enumerate(opt.param_groups) if g is group)]
        _check_param_state(opt, p, {**group, **saved_group}, entry, label)


def _check_group_options(opt: DerivationHost, index: int, saved: Mapping[str, Any]) -> None:
    ours = {d.name for d in opt._danlu_derivations}
    for derivation in ALL_DERIVATIONS:
        keys = list(derivation.defaults)
        present = [k for k in keys if k in saved]
        if derivation.name in ours and len(present) < len(keys):
            raise ValueError(
                f"parameter group {index} of the state dict has no {keys[0]!r}: it was saved without the "
                f"{derivation.name} derivation, which this optimizer has"
            )
        if derivation.name not in ours and present and present[0] not in opt.defaults:
            raise ValueError(
                f"parameter group {index} of the state dict has {present[0]!r}: it was saved with the "
                f"{derivation.name} derivation, which this optimizer does not have"
            )
    from danlu.base import DanluOptimizer

    if isinstance(opt, DanluOptimizer):
        # "differentiable" is added to defaults by torch's __setstate__ (every load_state_dict), not by danlu
        algorithm = [k for k in opt.defaults if k not in _derivation_keys() and k != "differentiable"]
        missing = [k for k in algorithm if k not in saved]
        if missing:
            raise ValueError(
                f"parameter group {index} of the state dict has no {missing[0]!r}: it was saved from another "
                f"optimizer than {type(opt).__name__}"
            )


def _derivation_keys() -> set[str]:
    return {k for d in ALL_DERIVATIONS for k in d.defaults}


def _check_param_state(
    opt: DerivationHost, p: Tensor, group: Mapping[str, Any], entry: Mapping[str, Any], label: str
) -> None:
    ours = {key for d in opt._danlu_derivations for key in d.state_keys}
    foreign = {key for d in ALL_DERIVATIONS for key in d.state_keys} - ours
    for key, value in entry.items():
        if key in foreign:
            raise ValueError(f"the state of {label} has {key!r}, from a derivation this optimizer does not have")
        if key in ours:
            _check_shape(label, key, value, tuple(p.shape))
    template = _base_template(opt, p, group)
    if template is not None:
        base_keys = {k for k in entry if k not in ours}
        never_stepped = not base_keys and group.get(APPLIED_STEPS, 0) == 0
        if entry and not never_stepped and base_keys != set(template):
            missing = sorted(set(template) - base_keys)
            extra = sorted(base_keys - set(template))
            what = f"lacks {missing}" if missing else f"has unexpected {extra}"
            raise ValueError(f"the state of {label} {what}: it was saved from another optimizer than {type(opt).__name__}")
        for key, shape in template.items():
            if key in entry:
                _check_shape(label, key, entry[key], shape)
    if group.get(APPLIED_STEPS, 0) > 0 and entry:
        for derivation in opt._danlu_derivations:
            for key in derivation.required_state:
                if key not in entry:
                    raise ValueError(f"the state of {label} has no {key!r}, which the {derivation.name} derivation keeps")


def _check_shape(label: str, key: str, value: Any, shape: tuple[int, ...]) -> None:
    if not isinstance(value, Tensor):
        raise ValueError(f"the state of {label} has {key!r} = {type(value).__name__}, expected a tensor")
    if tuple(value.shape) != shape:
        raise ValueError(f"the state of {label} has {key!r} of shape {tuple(value.shape)}, expected {shape}")


def _base_template(opt: DerivationHost, p: Tensor, group: Mapping[str, Any]) -> dict[str, tuple[int, ...]] | None:
    """The state keys and shapes of danlu's own algorithm for ``p`` (None for a foreign base)."""
    from danlu.base import DanluOptimizer

    if not isinstance(opt, DanluOptimizer):
        return None
    own_template = getattr(opt, "_state_template", None)  # an algorithm whose state depends on the parameter's name (Muon)
    if own_template is not None:
        template = own_template(p, group)
    else:
        template = {"step": torch.zeros(())}
        opt._init_state(torch.empty(p.shape, dtype=p.dtype, device="meta"), template, group)
    return {k: tuple(v.shape) for k, v in template.items() if isinstance(v, Tensor)}


def restore_derivation_state(opt: DerivationHost, state_dict: Mapping[str, Any], keys: Collection[str]) -> None:
    """Copy the derivations' saved entries into ``opt.state``, on each parameter's device, dtypes kept."""
    mapping = saved_params(opt, state_dict)
    for saved_id, entry in state_dict["state"].items():
        p = mapping[saved_id][0]
        for key, value in entry.items():
            if key in keys:
                opt.state[p][key] = value.to(device=p.device, copy=True) if isinstance(value, Tensor) else value


def keep_state_dtypes(opt: DerivationHost, state_dict: Mapping[str, Any]) -> None:
    """Undo torch's cast of floating-point state to the parameter dtype: keep the saved dtypes.

    Also never share a tensor with ``state_dict``: torch keeps the ``step`` tensors as they are, so
    loading another optimizer's live ``state_dict()`` would make both count each other's steps.
    """
    mapping = saved_params(opt, state_dict)
    for saved_id, entry in state_dict["state"].items():
        p = mapping[saved_id][0]
        loaded = opt.state[p]
        for key, value in entry.items():
            current = loaded.get(key)
            if not (isinstance(value, Tensor) and isinstance(current, Tensor)):
                continue
            if current.dtype != value.dtype:
                loaded[key] = value.to(device=current.device, copy=True)
            elif current is value:
                loaded[key] = value.clone()
