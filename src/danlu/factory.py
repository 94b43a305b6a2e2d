"""``create_optimizer``: an optimizer from a one-line spec such as ``"adamw+lookahead+ema"``.

Grammar::

    spec        := base ("+" derivation)*
    base        := one of OPTIMIZER_NAMES, or "torch.<Name>" for a torch.optim class
    derivation  := one of DERIVATION_NAMES (or an alias)

Names are case-insensitive; spaces around ``+`` are ignored. Derivations apply in the order written,
innermost first: ``"adam+weight_decay+layer_adaptation"`` is LAMB. Keyword arguments go to the base
optimizer and the derivations alike (``lr=1e-3, weight_decay_rate=0.01, ema_momentum=0.999``).

When the optimizer decays weights (``adamw``, ``lamb`` or a ``weight_decay`` derivation), biases and
normalization weights are put in a second parameter group with ``weight_decay_rate=0`` (the BERT
convention), unless ``exclude_from_weight_decay`` is given or ``no_decay_on_bias_and_norm=False``.

With ``muon`` as the base, embeddings and the output layer take Muon's Adam update
(:func:`muon_adam_names`), unless ``exclude_from_muon`` is given (``exclude_from_muon=()`` sends every
tensor with two or more dimensions to Newton-Schulz).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from danlu import derive
from danlu.derivations import ALL_DERIVATIONS, WeightDecay
from danlu.optimizers import SGD, Adadelta, Adafactor, Adagrad, Adam, Adamax, LazyAdam, Lion, Muon, NAdam, RAdam, RMSprop
from danlu.ready import AdamW, Lamb, Ranger

__all__ = ["create_optimizer", "parse_spec", "OPTIMIZER_NAMES", "DERIVATION_NAMES", "no_decay_names", "muon_adam_names"]

_OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "sgd": (SGD, {}),
    "sgdm": (SGD, {"momentum": 0.9}),
    "nag": (SGD, {"momentum": 0.9, "nesterov": True}),
    "adagrad": (Adagrad, {}),
    "adadelta": (Adadelta, {}),
    "rmsprop": (RMSprop, {}),
    "adam": (Adam, {}),
    "adamw": (AdamW, {}),
    "nadam": (NAdam, {}),
    "radam": (RAdam, {}),
    "adafactor": (Adafactor, {}),
    "lion": (Lion, {}),
    "adamax": (Adamax, {}),
    "lamb": (Lamb, {}),
    "lazyadam": (LazyAdam, {}),
    "ranger": (Ranger, {}),
    "muon": (Muon, {}),
}

_DERIVATIONS: dict[str, Callable[[type], type]] = {
    "weight_decay": derive.extend_with_weight_decay,
    "layer_adaptation": derive.extend_with_layer_adaptation,
    "piecewise_linear_lr": derive.extend_with_piecewise_linear_lr,
    "gradient_accumulation": derive.extend_with_gradient_accumulation,
    "lookahead": derive.extend_with_lookahead,
    "lazy": derive.extend_with_lazy_optimization,
    "ema": derive.extend_with_exponential_moving_average,
    "paramwise_lr": derive.extend_with_parameter_wise_lr,
    "skip_nonfinite": derive.extend_with_skip_nonfinite,
    "clip": derive.extend_with_gradient_clipping,
    "schedule_free": derive.extend_with_schedule_free,
}

_ALIASES = {
    "wd": "weight_decay",
    "decay": "weight_decay",
    "lars": "layer_adaptation",
    "trust_ratio": "layer_adaptation",
    "piecewise_lr": "piecewise_linear_lr",
    "warmup": "piecewise_linear_lr",
    "accum": "gradient_accumulation",
    "grad_accum": "gradient_accumulation",
    "la": "lookahead",
    "lazy_optimization": "lazy",
    "exponential_moving_average": "ema",
    "parameter_wise_lr": "paramwise_lr",
    "nonfinite": "skip_nonfinite",
    "skip_nan": "skip_nonfinite",
    "gradient_clipping": "clip",
    "schedulefree": "schedule_free",
    "sf": "schedule_free",
}

OPTIMIZER_NAMES: tuple[str, ...] = tuple(_OPTIMIZERS)
"""Base names accepted by :func:`create_optimizer` (plus ``torch.<Name>`` for ``torch.optim`` classes)."""
DERIVATION_NAMES: tuple[str, ...] = tuple(_DERIVATIONS)
"""Derivation names accepted by :func:`create_optimizer` (aliases: see ``danlu.factory._ALIASES``)."""

_NORM_NAME = re.compile(r"(^|[._])(bias|b)$|norm|(^|[._])ln(_?\d+)?([._]|$)", re.IGNORECASE)


def _resolve_base(name: str) -> tuple[type, dict[str, Any]]:
    if name.startswith("torch."):
        cls = getattr(torch.optim, name[len("torch.") :], None) if name[len("torch.") :].isidentifier() else None
        if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
            raise ValueError(f"unknown optimizer {name!r}: torch.optim has no optimizer class {name[len('torch.') :]!r}")
        return cls, {}
    key = name.lower()
    if key not in _OPTIMIZERS:
        raise ValueError(
            f"unknown optimizer {name!r}; valid optimizers: {', '.join(OPTIMIZER_NAMES)} (or torch.<Name>, e.g. torch.AdamW)"
        )
    return _OPTIMIZERS[key]


def parse_spec(spec: str) -> tuple[str, list[str]]:
    """Split and check a spec: ``"adamw+lookahead+ema"`` -> ``("adamw", ["lookahead", "ema"])``.

    Raises ``TypeError`` for a non-string and ``ValueError`` for an unknown or repeated name, listing the valid ones.

    Example:
        >>> parse_spec("AdamW + Lookahead + EMA")
        ('adamw', ['lookahead', 'ema'])
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string such as 'adamw+lookahead', got {type(spec).__name__} {spec!r}")
    parts = [part.strip() for part in spec.split("+")]
    if not parts[0] or any(not part for part in parts):
        raise ValueError(f"invalid spec {spec!r}: expected 'base+derivation+...', e.g. 'adamw+lookahead+ema'")
    base = parts[0] if parts[0].startswith("torch.") else parts[0].lower()
    _resolve_base(base)
    derivations = []
    for part in parts[1:]:
        key = _ALIASES.get(part.lower(), part.lower())
        if key not in _DERIVATIONS:
            raise ValueError(f"unknown derivation {part!r} in {spec!r}; valid derivations: {', '.join(DERIVATION_NAMES)}")
        if key in derivations:
            raise ValueError(f"derivation {key!r} appears twice in {spec!r}")
        derivations.append(key)
    return base, derivations


def no_decay_names(model_or_named_params: nn.Module | Iterable[tuple[str, Tensor]]) -> list[str]:
    """Names of the biases and normalization weights (the BERT convention: no weight decay for them).

    For a module: parameters of normalization layers (any module whose class name contains ``Norm``),
    parameters named ``*.bias``, and every parameter with fewer than two dimensions. For bare
    ``(name, tensor)`` pairs: names that look like biases or norms, and tensors with fewer than two dimensions.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> no_decay_names(model)
        ['0.bias', '1.weight', '1.bias']
    """
    if isinstance(model_or_named_params, nn.Module):
        names = set()
        for module_name, module in model_or_named_params.named_modules():
            if "Norm" in type(module).__name__:
                prefix = f"{module_name}." if module_name else ""
                names.update(prefix + n for n, _ in module.named_parameters(recurse=False))
        pairs = list(model_or_named_params.named_parameters())
        return [n for n, p in pairs if n in names or n.endswith("bias") or p.dim() < 2]
    return [n for n, p in model_or_named_params if p.dim() < 2 or _NORM_NAME.search(n)]


_OUTPUT_NAME = re.compile(r"(^|\.)(head|lm_head|classifier)(\.|$)")
_EMBEDDING_NAME = re.compile(r"embed", re.IGNORECASE)


def muon_adam_names(model_or_named_params: nn.Module | Iterable[tuple[str, Tensor]]) -> list[str]:
    """Names of the matrices that ``create_optimizer(model, "muon")`` gives the Adam update: embeddings and the output layer.

    For a module: the weights of every ``nn.Embedding`` (and ``nn.EmbeddingBag``), every parameter of a
    module named ``head``, ``lm_head`` or ``classifier``, and the weight of a ``Linear`` tied to an
    embedding (one tensor, listed under its first name). For bare ``(name, tensor)`` pairs: names that
    contain ``embed`` or a ``head``, ``lm_head`` or ``classifier`` component. Tensors with fewer than
    two dimensions take the Adam update anyway and are not listed.

    Example:
        >>> import torch
        >>> model = torch.nn.ModuleDict({"tok": torch.nn.Embedding(10, 4), "mlp": torch.nn.Linear(4, 4), "lm_head": torch.nn.Linear(4, 10)})
        >>> muon_adam_names(model)
        ['tok.weight', 'lm_head.weight']
    """
    if isinstance(model_or_named_params, nn.Module):
        pairs = list(model_or_named_params.named_parameters())
        chosen: set[int] = set()
        for module_name, module in model_or_named_params.named_modules():
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) or _OUTPUT_NAME.search(module_name + "."):
                chosen.update(id(p) for p in module.parameters(recurse=False))
        return [n for n, p in pairs if id(p) in chosen and p.dim() >= 2]
    return [n for n, p in model_or_named_params if p.dim() >= 2 and (_EMBEDDING_NAME.search(n) or _OUTPUT_NAME.search(n))]


def _named_parameters(model_or_named_params: Any) -> list[tuple[str, Tensor]]:
    if isinstance(model_or_named_params, nn.Module):
        return [(n, p) for n, p in model_or_named_params.named_parameters() if p.requires_grad]
    if isinstance(model_or_named_params, (str, bytes, Tensor)) or not isinstance(model_or_named_params, Iterable):
        raise TypeError(
            "model_or_named_params must be an nn.Module or an iterable of (name, parameter) pairs, "
            f"got {type(model_or_named_params).__name__}"
        )
    pairs = list(model_or_named_params)
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str) and isinstance(pair[1], Tensor)):
            raise TypeError(
                "model_or_named_params must be an nn.Module or an iterable of (name, parameter) pairs, "
                f"got an element {pair!r:.60}"
            )
    if not pairs:
        raise ValueError("model_or_named_params has no parameters")
    return pairs


def create_optimizer(
    model_or_named_params: nn.Module | Iterable[tuple[str, Tensor]],
    spec: str,
    *,
    no_decay_on_bias_and_norm: bool = True,
    **hyperparameters: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer described by ``spec`` (see the module docstring for the grammar).

    Args:
        model_or_named_params: an ``nn.Module`` (its trainable parameters are used) or
            ``(name, parameter)`` pairs such as ``model.named_parameters()``.
        spec: ``"base+derivation+..."``, e.g. ``"adamw"``, ``"radam+lookahead"``, ``"adamw+lookahead+ema"``.
        no_decay_on_bias_and_norm: with weight decay, put biases and normalization weights in a group
            with ``weight_decay_rate=0`` (ignored when ``exclude_from_weight_decay`` is given).
        **hyperparameters: keyword arguments of the base optimizer and of the derivations.

    Returns:
        An instance of the derived class, a ``torch.optim.Optimizer``.

    Example:
        >>> import torch, danlu
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        >>> opt = danlu.create_optimizer(model, "adamw+lookahead+ema", lr=1e-3, weight_decay_rate=0.01)
        >>> type(opt).__name__
        'AdamWWithLookaheadWithExponentialMovingAverage'
        >>> [g["weight_decay_rate"] for g in opt.param_groups]
        [0.01, 0.0]
    """
    if not isinstance(no_decay_on_bias_and_norm, bool):
        raise TypeError(f"no_decay_on_bias_and_norm must be True or False, got {no_decay_on_bias_and_norm!r}")
    base_name, derivation_names = parse_spec(spec)
    cls, base_defaults = _resolve_base(base_name)
    for name in derivation_names:
        cls = _DERIVATIONS[name](cls)
    pairs = _named_parameters(model_or_named_params)
    _check_keywords(spec, cls, hyperparameters)
    kwargs = {**base_defaults, **hyperparameters}
    if isinstance(cls, type) and issubclass(cls, Muon) and "exclude_from_muon" not in kwargs:
        source = model_or_named_params if isinstance(model_or_named_params, nn.Module) else pairs
        kwargs["exclude_from_muon"] = [f"^{re.escape(n)}$" for n in muon_adam_names(source)]
    decays = any(isinstance(d, WeightDecay) for d in getattr(cls, "_danlu_derivations", ()))
    if decays and no_decay_on_bias_and_norm and "exclude_from_weight_decay" not in kwargs:
        return cls(_bert_groups(model_or_named_params, pairs), **kwargs)
    return cls(pairs, **kwargs)


_TORCH_STYLE_HINTS: dict[str, str] = {
    "weight_decay": "weight_decay_rate",
    "learning_rate": "lr",
    "k": "steps_per_slow_update",
    "la_steps": "steps_per_slow_update",
    "la_alpha": "slow_step_size",
    "ema_decay": "ema_momentum",
    "decay": "ema_momentum",
    "gradient_accumulation_steps": "grad_accum_steps",
    "accumulation_steps": "grad_accum_steps",
}
"""Keyword names of torch.optim, transformers and timm that have a danlu equivalent under another name."""


_DERIVATION_OF_KEYWORD: dict[str, str] = {
    key: _ALIASES.get(d.name, d.name) for d in ALL_DERIVATIONS for key in d.defaults
}
"""The spec name of the derivation that takes each derivation keyword."""


def _valid_keywords(cls: type) -> tuple[str, ...] | None:
    """The keyword arguments ``cls`` takes after ``params`` (None when its root takes ``**kwargs``)."""
    root = getattr(cls, "_danlu_root", cls)
    try:
        parameters = list(inspect.signature(root).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    names = [p.name for p in parameters[1:] if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for derivation in getattr(cls, "_danlu_derivations", ()):
        names.extend(derivation.defaults)
    return tuple(names)


def _check_keywords(spec: str, cls: type, hyperparameters: dict[str, Any]) -> None:
    valid = _valid_keywords(cls)
    if valid is None:
        return
    for key in hyperparameters:
        if key in valid:
            continue
        message = f"create_optimizer({spec!r}): unexpected keyword argument {key!r}"
        hint = _TORCH_STYLE_HINTS.get(key)
        if key == "weight_decay" and hint in valid:
            message += f"; danlu's decoupled weight decay is {hint!r}"
        elif hint in valid:
            message += f"; danlu calls it {hint!r}"
        elif key == "weight_decay_rate" and "weight_decay" in valid:
            message += f"; {spec!r} takes torch's 'weight_decay' (add '+weight_decay' for danlu's decoupled decay)"
        elif key in _DERIVATION_OF_KEYWORD:
            derivation = _DERIVATION_OF_KEYWORD[key]
            message += f"; it belongs to the {derivation!r} derivation: add '+{derivation}' to the spec"
        elif key == "weight_decay":
            message += f"; {spec!r} has no weight decay: use 'adamw' or add '+weight_decay', then pass weight_decay_rate"
        raise TypeError(f"{message}. Valid keyword arguments for {spec!r}: {', '.join(valid)}")


def _bert_groups(model_or_named_params: Any, pairs: list[tuple[str, Tensor]]) -> list[dict[str, Any]]:
    source = model_or_named_params if isinstance(model_or_named_params, nn.Module) else pairs
    excluded = set(no_decay_names(source))
    decay = [(n, p) for n, p in pairs if n not in excluded]
    no_decay = [(n, p) for n, p in pairs if n in excluded]
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay_rate": 0.0})
    return groups
