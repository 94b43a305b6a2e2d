r"""timm-style parameter groups: no weight decay for biases and norms, layer-wise lr decay.

Two pieces that fit together:

* :func:`param_groups` splits a model's named parameters into parameter groups. Biases,
  normalization weights (by module type, by name pattern, or every tensor with fewer than two
  dimensions) get ``weight_decay_rate=0``; with ``layer_decay`` every group also carries an
  ``lr_scale``: :math:`\text{layer\_decay}^{L - \text{layer}}`, 1 for the head, smaller towards the
  embeddings, as in BEiT, ELECTRA and timm's ``param_groups_layer_decay``.
* :func:`extend_with_lr_scale` is a derivation that multiplies each group's learning rate by its
  ``lr_scale`` *inside* the optimizer, at every step.

Design: the scale is not baked into ``group["lr"]``. An LR scheduler owns ``group["lr"]``: it
sets the same base lr in every group (``OneCycleLR(max_lr=1e-3)``, ``CosineAnnealingLR(eta_min=...)``,
``ReduceLROnPlateau(min_lr=...)`` all write group lrs that know nothing of layer scales, so a
scale baked into the lr would be lost or distorted), and the derivation applies
:math:`\eta_t = \text{lr} \cdot \text{lr\_scale} \cdot (\text{other multipliers})` when the step runs.
The scaled lr is the :math:`\eta_t` that every other derivation sees (decoupled weight decay is
scaled with it, as in timm; LAMB's trust ratio divides by it), on danlu's optimizers and on
``torch.optim`` ones alike, with no parameter copy. ``lr_scale`` is also the key timm's own schedulers
read, so the groups mean the same thing there.

:func:`build_optimizer` does both in one call from a ``create_optimizer`` spec.

Example:
    >>> import torch, danlu
    >>> from danlu.grouping import param_groups, extend_with_lr_scale
    >>> model = torch.nn.ModuleDict({
    ...     "embed": torch.nn.Embedding(10, 4),
    ...     "layers": torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]),
    ...     "norm": torch.nn.LayerNorm(4),
    ...     "head": torch.nn.Linear(4, 2),
    ... })
    >>> groups = param_groups(model, weight_decay_rate=0.05, layer_decay=0.5)
    >>> for g in groups:
    ...     print(g["lr_scale"], g["weight_decay_rate"], [name for name, _ in g["params"]])
    0.125 0.05 ['embed.weight']
    0.25 0.05 ['layers.0.weight']
    0.25 0.0 ['layers.0.bias']
    0.5 0.05 ['layers.1.weight']
    0.5 0.0 ['layers.1.bias']
    1.0 0.05 ['head.weight']
    1.0 0.0 ['norm.weight', 'norm.bias', 'head.bias']
    >>> opt = extend_with_lr_scale(danlu.AdamW)(groups, lr=1e-3)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from danlu._validate import check_number, check_patterns
from danlu.derivations._base import Derivation

__all__ = [
    "LRScale",
    "extend_with_lr_scale",
    "param_groups",
    "no_decay_parameter_names",
    "layer_ids",
    "auto_layer_id",
    "build_optimizer",
    "NORM_MODULES",
]

NORM_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
"""Module types whose parameters get no weight decay (also: any module whose class name contains ``Norm``)."""

_BLOCK = re.compile(r"(?:^|\.)(?:layers?|blocks?|h|stages?|resblocks)\.(\d+)(?:\.|$)")
_EMBEDDING = re.compile(r"embed|(?:^|\.)(?:wte|wpe|cls_token|pos_embed|mask_token|dist_token)(?:\.|$)")


class LRScale(Derivation):
    r"""Multiply each group's learning rate by the group's ``lr_scale`` at every step.

    .. math::

        \eta_t = \text{lr} \cdot \text{lr\_scale} \cdot (\text{the other lr multipliers})

    ``lr`` stays whatever the LR scheduler writes; the scale is applied inside the step, so it is
    the :math:`\eta_t` that weight decay and layer adaptation see, and it is kept (with every other
    group option) by ``state_dict()``. The groups built by :func:`param_groups` carry ``lr_scale``.

    Keyword arguments: ``lr_scale=1.0`` (finite, >= 0), usually set per group.

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.zeros(1)); v = torch.nn.Parameter(torch.zeros(1))
        >>> opt = danlu.grouping.extend_with_lr_scale(torch.optim.SGD)(
        ...     [{"params": [w], "lr_scale": 0.5}, {"params": [v]}], lr=1.0)
        >>> w.grad = torch.ones(1); v.grad = torch.ones(1); _ = opt.step()
        >>> w.item(), v.item(), [g["lr"] for g in opt.param_groups]
        (-0.5, -1.0, [1.0, 1.0])
    """

    name = "lr_scale"
    title = "LRScale"
    defaults = {"lr_scale": 1.0}

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        if "lr_scale" not in options:
            return {}
        return {"lr_scale": check_number("lr_scale", options["lr_scale"], low=0.0)}

    def lr_multiplier(self, group: Mapping[str, Any]) -> float:
        return float(group.get("lr_scale", 1.0))


def extend_with_lr_scale(BaseOptimizer: type, name: str | None = None) -> type:
    """Add a per-group lr multiplier ``lr_scale`` (see :class:`LRScale`) to any optimizer class.

    Like every ``extend_with_*``, ``BaseOptimizer`` may be a danlu optimizer, a ``torch.optim`` one
    or an already-derived class; the scale multiplies the lr of the step, so it composes with
    ``extend_with_piecewise_linear_lr`` and with LR schedulers by multiplication.

    Example:
        >>> import torch, danlu
        >>> Scaled = danlu.grouping.extend_with_lr_scale(danlu.AdamW)
        >>> Scaled.__name__
        'AdamWWithLRScale'
        >>> opt = Scaled([{"params": torch.nn.Linear(2, 2).parameters(), "lr_scale": 0.1}], lr=1e-3)
        >>> opt.param_groups[0]["lr_scale"]
        0.1
    """
    from danlu.derive import extend_with

    return extend_with(BaseOptimizer, LRScale(), name)


def _named(model: nn.Module | Iterable[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    if isinstance(model, nn.Module):
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(model, (str, bytes, Tensor)) or not isinstance(model, Iterable):
        raise TypeError(f"model must be an nn.Module or (name, parameter) pairs, got {type(model).__name__}")
    pairs = list(model)
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], Tensor)):
            raise TypeError(f"model must be an nn.Module or (name, parameter) pairs, got an element {pair!r:.60}")
    return pairs


def no_decay_parameter_names(
    model: nn.Module | Iterable[tuple[str, Tensor]],
    *,
    patterns: Sequence[str] = (),
    modules: Sequence[type[nn.Module]] = NORM_MODULES,
    bias: bool = True,
    one_dimensional: bool = True,
) -> set[str]:
    """The names of the parameters that should get no weight decay.

    A parameter is excluded from decay if any of these holds:

    * ``bias`` and its name ends with ``bias``;
    * it belongs (directly) to a module of one of the ``modules`` types, or to a module whose class
      name contains ``Norm`` (catches ``LlamaRMSNorm``, ``T5LayerNorm`` ...); needs an ``nn.Module``;
    * ``one_dimensional`` and it has fewer than two dimensions (timm's rule: biases, norm scales,
      layer-scale gammas);
    * its name matches one of the regular expressions ``patterns`` (``re.search``);
    * the model has a ``no_weight_decay()`` method (timm's convention) that lists its name, or the
      name of a module it belongs to.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
        >>> sorted(no_decay_parameter_names(model))
        ['0.bias', '1.bias', '1.weight', '2.bias']
        >>> sorted(no_decay_parameter_names(model, one_dimensional=False, modules=(), bias=False, patterns=[r"^2\\."]))
        ['1.bias', '1.weight', '2.bias', '2.weight']
    """
    checked = check_patterns("patterns", patterns)
    pairs = _named(model)
    names: set[str] = set()
    if isinstance(model, nn.Module):
        module_types = tuple(modules)
        for module_name, module in model.named_modules():
            if (module_types and isinstance(module, module_types)) or "Norm" in type(module).__name__:
                prefix = f"{module_name}." if module_name else ""
                names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
        listed = getattr(model, "no_weight_decay", None)
        if callable(listed):
            keys = set(listed())
            names.update(n for n, _ in pairs if n in keys or any(n.startswith(f"{k}.") for k in keys))
    for name, p in pairs:
        if (bias and name.endswith("bias")) or (one_dimensional and p.dim() < 2) or (checked and any(re.search(pattern, name) for pattern in checked)):
            names.add(name)
    return names & {n for n, _ in pairs}


def auto_layer_id(name: str) -> int | None:
    """The layer of a parameter guessed from its name: 0 for embeddings, ``i + 1`` for block ``i``.

    Blocks are the numbered children of a container called ``layer``, ``layers``, ``block``,
    ``blocks``, ``h``, ``stage``, ``stages`` or ``resblocks`` (BERT's ``encoder.layer.3``, GPT-2's
    ``h.3``, timm's ``blocks.3``, Llama's ``layers.3``); embeddings are names containing ``embed``,
    or the ``wte``/``wpe``/``cls_token``/``pos_embed`` tensors. Anything else (pooler, final norm,
    head) returns ``None``: it belongs to the top layer.

    Example:
        >>> [auto_layer_id(n) for n in ["bert.embeddings.word_embeddings.weight",
        ...     "bert.encoder.layer.3.output.dense.weight", "transformer.h.11.mlp.c_fc.weight", "classifier.bias"]]
        [0, 4, 12, None]
    """
    match = _BLOCK.search(name)
    if match:
        return int(match.group(1)) + 1
    if _EMBEDDING.search(name):
        return 0
    return None


LayerIdSpec = Callable[[str], "int | None"] | Mapping[str, int] | Sequence[nn.Module] | None


def layer_ids(
    model: nn.Module | Iterable[tuple[str, Tensor]], layer_id: LayerIdSpec = None
) -> tuple[dict[str, int], int]:
    """Assign every parameter a layer, 0 (bottom) to ``top`` (the head); return ``(ids, top)``.

    ``layer_id`` says how:

    * ``None``: :func:`auto_layer_id`, by name;
    * a callable ``name -> int | None``;
    * a dict of regular expression -> layer (the first pattern found with ``re.search`` wins);
    * a list of modules of ``model``: the parameters of the i-th module are in layer i (by module,
      e.g. ``[model.embeddings, *model.encoder.layer]``).

    Parameters that get ``None`` (or match nothing) are in the top layer, one above the highest
    layer assigned.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
        >>> layer_ids(model, [model[0], model[1]])
        ({'0.weight': 0, '0.bias': 0, '1.weight': 1, '1.bias': 1, '2.weight': 2, '2.bias': 2}, 2)
        >>> layer_ids(model, {r"^0\\.": 0})[1]
        1
    """
    pairs = _named(model)
    assign: Callable[[str], int | None]
    if layer_id is None:
        assign = auto_layer_id
    elif callable(layer_id) and not isinstance(layer_id, nn.Module):
        assign = layer_id
    elif isinstance(layer_id, Mapping):
        compiled = [(re.compile(p), i) for p, i in layer_id.items()]

        def assign(name: str) -> int | None:
            return next((i for pattern, i in compiled if pattern.search(name)), None)

    elif isinstance(layer_id, Sequence) and all(isinstance(m, nn.Module) for m in layer_id):
        by_param = {id(p): i for i, module in enumerate(layer_id) for p in module.parameters()}
        if not by_param and layer_id:
            raise ValueError("layer_id: the modules given have no parameters")

        def assign(name: str) -> int | None:
            return by_param.get(id(dict(pairs)[name]))

    else:
        raise TypeError(
            "layer_id must be None, a callable name -> int, a dict regex -> int or a list of modules, "
            f"got {type(layer_id).__name__}"
        )
    raw = {name: assign(name) for name, _ in pairs}
    for name, value in raw.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(f"layer_id: the layer of {name!r} must be an int >= 0 or None, got {value!r}")
    assigned = [v for v in raw.values() if v is not None]
    top = max(assigned) + 1 if assigned else 0
    return {name: top if value is None else value for name, value in raw.items()}, top


def param_groups(
    model: nn.Module | Iterable[tuple[str, Tensor]],
    *,
    weight_decay_rate: float | None = None,
    layer_decay: float | None = None,
    layer_id: LayerIdSpec = None,
    no_decay: Sequence[str] = (),
    no_decay_modules: Sequence[type[nn.Module]] = NORM_MODULES,
    no_decay_bias: bool = True,
    no_decay_1d: bool = True,
    weight_decay_key: str = "weight_decay_rate",
) -> list[dict[str, Any]]:
    r"""Split a model's parameters into groups: decay / no decay, and one lr scale per layer.

    Args:
        model: an ``nn.Module`` (its trainable parameters) or ``(name, parameter)`` pairs. Groups
            hold ``(name, parameter)`` pairs, so name-based derivation options keep working.
        weight_decay_rate: the decay of the decayed groups; ``None`` leaves it to the optimizer's
            default. The no-decay groups always get 0.
        layer_decay: if given, each group gets ``lr_scale = layer_decay ** (top - layer)``; apply
            it with :func:`extend_with_lr_scale` (or :func:`build_optimizer`).
        layer_id: how to find a parameter's layer (see :func:`layer_ids`); default by name.
        no_decay: extra regular expressions of names that get no decay.
        no_decay_modules: module types whose parameters get no decay (default: the norms).
        no_decay_bias: no decay for names ending in ``bias``.
        no_decay_1d: no decay for tensors with fewer than two dimensions (timm's rule).
        weight_decay_key: the group key of the decay: ``"weight_decay_rate"`` for
            ``extend_with_weight_decay`` (danlu's ``AdamW``, ``Lamb``), ``"weight_decay"`` for
            ``torch.optim.AdamW``.

    Returns:
        A list of param-group dicts, ordered by layer, each with ``params`` (named pairs in model
        order), the decay key, and ``lr_scale`` when ``layer_decay`` is given.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> [(len(g["params"]), g["weight_decay"]) for g in param_groups(model, weight_decay_rate=0.1,
        ...                                                               weight_decay_key="weight_decay")]
        [(1, 0.1), (3, 0.0)]
        >>> opt = torch.optim.AdamW(param_groups(model, weight_decay_rate=0.1, weight_decay_key="weight_decay"))
    """
    if weight_decay_rate is not None:
        weight_decay_rate = check_number("weight_decay_rate", weight_decay_rate, low=0.0)
    if layer_decay is not None:
        layer_decay = check_number("layer_decay", layer_decay, low=0.0, low_open=True)
    if not isinstance(weight_decay_key, str) or not weight_decay_key:
        raise TypeError(f"weight_decay_key must be a non-empty string, got {weight_decay_key!r}")
    pairs = _named(model)
    if not pairs:
        raise ValueError("model has no trainable parameters")
    excluded = no_decay_parameter_names(
        model if isinstance(model, nn.Module) else pairs,
        patterns=no_decay,
        modules=no_decay_modules,
        bias=no_decay_bias,
        one_dimensional=no_decay_1d,
    )
    if layer_decay is not None:
        ids, top = layer_ids(model if isinstance(model, nn.Module) else pairs, layer_id)
    else:
        ids, top = {name: 0 for name, _ in pairs}, 0
    buckets: dict[tuple[int, bool], list[tuple[str, Tensor]]] = {}
    for name, p in pairs:
        buckets.setdefault((ids[name], name not in excluded), []).append((name, p))
    groups: list[dict[str, Any]] = []
    for (layer, decays), members in sorted(buckets.items(), key=lambda item: (item[0][0], not item[0][1])):
        group: dict[str, Any] = {"params": members}
        if not decays:
            group[weight_decay_key] = 0.0
        elif weight_decay_rate is not None:
            group[weight_decay_key] = weight_decay_rate
        if layer_decay is not None:
            group["lr_scale"] = float(layer_decay ** (top - layer))
        groups.append(group)
    return groups


def build_optimizer(
    model: nn.Module | Iterable[tuple[str, Tensor]],
    spec: str,
    *,
    layer_decay: float | None = None,
    layer_id: LayerIdSpec = None,
    no_decay: Sequence[str] = (),
    no_decay_modules: Sequence[type[nn.Module]] = NORM_MODULES,
    no_decay_bias: bool = True,
    no_decay_1d: bool = True,
    **hyperparameters: Any,
) -> torch.optim.Optimizer:
    """:func:`danlu.create_optimizer` with timm-style groups and (optionally) layer-wise lr decay.

    ``spec`` is a :func:`danlu.create_optimizer` spec (``"adamw"``, ``"lamb+ema"``,
    ``"torch.AdamW+lookahead"``); ``weight_decay_rate`` (or ``weight_decay`` for a ``torch.*``
    base) among ``hyperparameters`` is the decay of the decayed groups. With ``layer_decay``, the
    class is also extended with :func:`extend_with_lr_scale` (outermost, so LAMB's trust ratio and
    the decay see the scaled lr).

    Example:
        >>> import torch, danlu
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> opt = danlu.grouping.build_optimizer(model, "adamw+ema", lr=1e-3, weight_decay_rate=0.05,
        ...                                      layer_decay=0.5, layer_id=[model[0]])
        >>> [(g["lr_scale"], g["weight_decay_rate"]) for g in opt.param_groups]
        [(0.5, 0.05), (0.5, 0.0), (1.0, 0.05), (1.0, 0.0)]
    """
    from danlu.derivations import WeightDecay
    from danlu.factory import _DERIVATIONS, _resolve_base, parse_spec

    base_name, derivation_names = parse_spec(spec)
    cls, base_defaults = _resolve_base(base_name)
    for derivation_name in derivation_names:
        cls = _DERIVATIONS[derivation_name](cls)
    if layer_decay is not None:
        cls = extend_with_lr_scale(cls)
    kwargs = {**base_defaults, **hyperparameters}
    decoupled = any(isinstance(d, WeightDecay) for d in getattr(cls, "_danlu_derivations", ()))
    key = "weight_decay_rate" if decoupled else "weight_decay"
    groups = param_groups(
        model,
        weight_decay_rate=kwargs.pop(key, None),
        layer_decay=layer_decay,
        layer_id=layer_id,
        no_decay=no_decay,
        no_decay_modules=no_decay_modules,
        no_decay_bias=no_decay_bias,
        no_decay_1d=no_decay_1d,
        weight_decay_key=key,
    )
    if not decoupled and not any(key in g and g[key] > 0 for g in groups):
        for group in groups:  # no decay anywhere: don't set a key the base may not know
            group.pop(key, None)
    return cls(groups, **kwargs)
