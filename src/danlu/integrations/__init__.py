"""Glue for the training frameworks people already use.

* :mod:`danlu.integrations.transformers`: build a danlu optimizer and scheduler from a Hugging Face
  ``TrainingArguments`` for ``Trainer(optimizers=(optimizer, scheduler))``, and a ``Trainer`` that
  evaluates with the EMA weights;
* :mod:`danlu.integrations.lightning`: a PyTorch Lightning callback that validates (and tests, and
  predicts) with the EMA weights.

The submodules import their framework when they are imported; this package itself imports
nothing heavy. :func:`unwrap_optimizer` and :func:`has_ema` work with every framework.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["unwrap_optimizer", "has_ema", "ema_ready"]


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside a framework's wrapper.

    Follows ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, used by ``transformers.Trainer``)
    and ``._optimizer`` (Lightning's ``LightningOptimizer``) until it reaches a plain optimizer.

    Example:
        >>> import torch, danlu
        >>> opt = danlu.Adam([torch.nn.Parameter(torch.zeros(1))])
        >>> class Wrapper:  # what accelerate and Lightning do
        ...     def __init__(self, optimizer): self.optimizer = optimizer
        >>> unwrap_optimizer(Wrapper(Wrapper(opt))) is opt
        True
    """
    for _ in range(16):
        candidates = (getattr(optimizer, "optimizer", None), getattr(optimizer, "_optimizer", None))
        inner = next((c for c in candidates if c is not None), None)
        if inner is None:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer or a wrapper of one, got {type(optimizer).__name__}")
    return optimizer


def has_ema(optimizer: Any) -> bool:
    """Whether the (unwrapped) optimizer keeps EMA weights (``extend_with_exponential_moving_average``).

    Example:
        >>> import torch, danlu
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> has_ema(danlu.create_optimizer([("w", p[0])], "adam+ema")), has_ema(danlu.Adam(p))
        (True, False)
    """
    return callable(getattr(unwrap_optimizer(optimizer), "apply_ema_weights", None))


def ema_ready(optimizer: Any) -> bool:
    """Whether the optimizer has EMA weights to apply: it has the derivation and has applied a step.

    Before the first step ``apply_ema_weights()`` raises (there is no average yet); callbacks use this
    to skip, e.g., Lightning's sanity-check validation.

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = danlu.create_optimizer([("w", w)], "sgd+ema", lr=0.1)
        >>> ema_ready(opt)
        False
        >>> w.grad = torch.ones(1); _ = opt.step()
        >>> ema_ready(opt)
        True
    """
    if not has_ema(optimizer):
        return False
    inner = unwrap_optimizer(optimizer)
    return any(group.get("applied_steps", 0) > 0 for group in inner.param_groups)
