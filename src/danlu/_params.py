"""Normalization of the ``params`` argument that every optimizer accepts.

``torch.optim`` accepts an iterable of tensors, of param-group dicts, or (since
torch 2.6) of ``(name, tensor)`` pairs. danlu accepts all three on every
supported torch version: names are split off into the group's ``param_names``
list, the key torch itself uses, so that name-based options can find them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["normalize_params", "normalize_group"]


def _split_named(entries: list[Any], where: str) -> tuple[list[Any], list[str] | None]:
    named = [isinstance(e, tuple) for e in entries]
    if not any(named):
        return entries, None
    if not all(named):
        raise ValueError(f"{where}: either every parameter has a name or none has; got a mix of (name, tensor) pairs and tensors")
    tensors, names = [], []
    for entry in entries:
        if len(entry) != 2 or not isinstance(entry[0], str):
            raise TypeError(f"{where}: a named parameter must be a (str, Tensor) pair, got {entry!r:.80}")
        names.append(entry[0])
        tensors.append(entry[1])
    return tensors, names


def normalize_group(group: dict[str, Any], where: str = "params") -> dict[str, Any]:
    """Return a shallow copy of ``group`` whose ``params`` is a list of tensors (names moved to ``param_names``)."""
    if not isinstance(group, dict):
        raise TypeError(f"{where}: a parameter group must be a dict, got {type(group).__name__}")
    if "params" not in group:
        raise ValueError(f"{where}: a parameter group needs a 'params' entry")
    group = dict(group)
    params = group["params"]
    if isinstance(params, torch.Tensor):
        params = [params]
    elif isinstance(params, set):
        raise TypeError(f"{where}: parameters must be an ordered collection, not a set (its order changes between runs)")
    elif isinstance(params, tuple) and len(params) == 2 and isinstance(params[0], str):
        params = [params]
    else:
        params = list(params)
    tensors, names = _split_named(params, where)
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{where}: parameter {index} is a {type(tensor).__name__}, expected a torch.Tensor")
    if len({id(t) for t in tensors}) != len(tensors):
        raise ValueError(f"{where}: a parameter appears twice in one parameter group")
    group["params"] = tensors
    if names is not None:
        group["param_names"] = names
    return group


def normalize_params(params: Any) -> list[dict[str, Any]]:
    """Turn anything ``torch.optim`` accepts as ``params`` into a list of normalized group dicts."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params: expected an iterable of tensors, (name, tensor) pairs or dicts, got a single Tensor; wrap it in a list")
    if isinstance(params, dict):
        raise TypeError("params: expected an iterable of parameter groups, got a single dict; wrap it in a list")
    if not isinstance(params, Iterable):
        raise TypeError(f"params: expected an iterable of tensors, (name, tensor) pairs or dicts, got {type(params).__name__}")
    entries = list(params)
    if not entries:
        raise ValueError("params: optimizer got an empty parameter list")
    if all(isinstance(e, dict) for e in entries):
        groups = [normalize_group(g, f"params[{i}]") for i, g in enumerate(entries)]
    elif any(isinstance(e, dict) for e in entries):
        raise TypeError("params: expected either parameter groups (dicts) or parameters, not a mix of both")
    else:
        groups = [normalize_group({"params": entries})]
    if any(not g["params"] for g in groups):
        raise ValueError("params: a parameter group has an empty parameter list")
    return groups
