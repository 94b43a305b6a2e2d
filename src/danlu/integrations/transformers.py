"""Hugging Face ``transformers.Trainer`` with danlu optimizers.

``Trainer`` takes a ready optimizer and scheduler through ``optimizers=(optimizer, scheduler)``.
:func:`create_optimizer_and_scheduler` builds both from the model and the ``TrainingArguments``:
the optimizer from a :func:`danlu.create_optimizer` spec with timm-style groups (no decay for biases
and norms, optional layer-wise lr decay, see :mod:`danlu.grouping`), the scheduler with
``transformers.get_scheduler`` from ``args.lr_scheduler_type`` and the warm-up of ``args``::

    from danlu.integrations.transformers import EMATrainer, create_optimizer_and_scheduler

    optimizer, scheduler = create_optimizer_and_scheduler(model, args, num_training_steps, "adamw+ema")
    trainer = EMATrainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                         optimizers=(optimizer, scheduler))
    trainer.train()          # evaluation inside train() uses the EMA weights
    trainer.evaluate()       # so does this

Things to know:

* ``Trainer`` accumulates gradients itself (``gradient_accumulation_steps``) and calls
  ``optimizer.step()`` and ``scheduler.step()`` once per optimizer step: use that, not
  ``extend_with_gradient_accumulation``, or the two multiply.
* ``Trainer`` clips gradients (``max_grad_norm=1.0`` by default) before ``optimizer.step()``.
* The scheduler sets the base lr; ``extend_with_piecewise_linear_lr`` would multiply a second
  schedule into it (see the scheduler guide).
* Checkpoints: ``Trainer`` saves ``optimizer.state_dict()``, which carries the EMA weights, Lookahead
  slow weights and every counter, so ``train(resume_from_checkpoint=...)`` resumes exactly.
* Exporting the EMA weights: ``with ema_weights(trainer.optimizer): trainer.save_model(directory)``.
  With ``load_best_model_at_end``, :class:`EMATrainer` ends with the EMA weights of the best checkpoint.
* ``Trainer(optimizer_cls_and_kwargs=(danlu.AdamW, {...}))`` builds groups with torch's
  ``weight_decay`` key; danlu reads it as the group's ``weight_decay_rate`` (see
  :func:`danlu.derivations.weight_decay.adopt_torch_weight_decay`).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from danlu.grouping import LayerIdSpec, build_optimizer
from danlu.integrations import ema_ready, unwrap_optimizer

try:
    import transformers
except ImportError as error:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "danlu.integrations.transformers needs the transformers package: pip install transformers accelerate"
    ) from error

__all__ = ["optimizer_kwargs_from_args", "create_optimizer", "create_optimizer_and_scheduler", "EMATrainer", "ema_weights"]


def _root_parameters(spec: str) -> set[str]:
    from danlu.factory import _resolve_base, parse_spec

    base, _ = parse_spec(spec)
    cls, _ = _resolve_base(base)
    root: type = getattr(cls, "_danlu_root", cls)
    return set(inspect.signature(root).parameters)


def optimizer_kwargs_from_args(args: Any, spec: str = "adamw") -> dict[str, Any]:
    """The hyperparameters that a ``TrainingArguments`` sets, named for the base optimizer of ``spec``.

    ``learning_rate`` -> ``lr``; ``weight_decay`` -> ``weight_decay_rate`` when the spec decays
    (``adamw``, ``lamb``, ``+weight_decay``; danlu's decoupled decay) or ``weight_decay`` for a
    ``torch.*`` base that has it; ``adam_beta1``/``adam_beta2`` -> ``betas`` and ``adam_epsilon`` ->
    ``eps`` when the base takes them.

    Example:
        >>> from transformers import TrainingArguments
        >>> args = TrainingArguments("out", learning_rate=3e-5, weight_decay=0.01, report_to=[])
        >>> optimizer_kwargs_from_args(args, "adamw")
        {'lr': 3e-05, 'weight_decay_rate': 0.01, 'betas': (0.9, 0.999), 'eps': 1e-08}
        >>> optimizer_kwargs_from_args(args, "lion")
        {'lr': 3e-05, 'betas': (0.9, 0.999)}
    """
    from danlu.factory import _DERIVATIONS, _resolve_base, parse_spec

    base, derivations = parse_spec(spec)
    cls, _ = _resolve_base(base)
    for name in derivations:
        cls = _DERIVATIONS[name](cls)
    accepted = _root_parameters(spec)
    decays = any(type(d).__name__ == "WeightDecay" for d in getattr(cls, "_danlu_derivations", ()))
    kwargs: dict[str, Any] = {"lr": float(args.learning_rate)}
    if decays:
        kwargs["weight_decay_rate"] = float(args.weight_decay)
    elif "weight_decay" in accepted:
        kwargs["weight_decay"] = float(args.weight_decay)
    if "betas" in accepted:
        kwargs["betas"] = (float(args.adam_beta1), float(args.adam_beta2))
    if "eps" in accepted:
        kwargs["eps"] = float(args.adam_epsilon)
    return kwargs


def create_optimizer(
    model: nn.Module | Iterable[tuple[str, Tensor]],
    args: Any,
    spec: str = "adamw",
    *,
    layer_decay: float | None = None,
    layer_id: LayerIdSpec = None,
    **overrides: Any,
) -> torch.optim.Optimizer:
    """A danlu optimizer for ``model`` from ``args`` (see :func:`optimizer_kwargs_from_args`).

    ``overrides`` replace or add hyperparameters (``eps=1e-6``, ``ema_momentum=0.999``,
    ``steps_per_slow_update=5`` ...). Biases and normalization weights get no weight decay
    (:func:`danlu.grouping.param_groups`); ``layer_decay`` adds layer-wise lr decay.

    Example:
        >>> import torch
        >>> from transformers import TrainingArguments
        >>> args = TrainingArguments("out", learning_rate=1e-3, weight_decay=0.01, report_to=[])
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> opt = create_optimizer(model, args, "adamw+ema", ema_momentum=0.99)
        >>> [(g["lr"], g["weight_decay_rate"], g["ema_momentum"]) for g in opt.param_groups]
        [(0.001, 0.01, 0.99), (0.001, 0.0, 0.99)]
    """
    kwargs = {**optimizer_kwargs_from_args(args, spec), **overrides}
    return build_optimizer(model, spec, layer_decay=layer_decay, layer_id=layer_id, **kwargs)


def create_optimizer_and_scheduler(
    model: nn.Module | Iterable[tuple[str, Tensor]],
    args: Any,
    num_training_steps: int,
    spec: str = "adamw",
    **kwargs: Any,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``.

    The scheduler is ``transformers.get_scheduler(args.lr_scheduler_type, ...)`` with
    ``args.get_warmup_steps(num_training_steps)`` warm-up steps and ``args.lr_scheduler_kwargs``,
    exactly what ``Trainer`` would build for its own optimizer. ``num_training_steps`` counts
    optimizer steps (``args.max_steps``, or epochs x batches / ``gradient_accumulation_steps``).
    ``kwargs`` go to :func:`create_optimizer`.

    Example:
        >>> import torch
        >>> from transformers import TrainingArguments
        >>> args = TrainingArguments("out", learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="linear",
        ...                          report_to=[])
        >>> opt, sched = create_optimizer_and_scheduler(torch.nn.Linear(2, 2), args, 10, "lamb")
        >>> lrs = []
        >>> for _ in range(4):
        ...     lrs.append(opt.param_groups[0]["lr"]); opt.step(); sched.step()
        >>> [round(lr, 6) for lr in lrs]
        [0.0, 0.0005, 0.001, 0.000875]
    """
    optimizer = create_optimizer(model, args, spec, **kwargs)
    scheduler = transformers.get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.get_warmup_steps(num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=dict(args.lr_scheduler_kwargs or {}),
    )
    return optimizer, scheduler


@contextlib.contextmanager
def ema_weights(optimizer: Any, bias_correction: bool = True) -> Iterator[bool]:
    """Inside the block, the model holds the EMA weights if the optimizer has some (yields whether it does).

    Works on a wrapped optimizer (``trainer.optimizer`` is accelerate's wrapper) and does nothing
    for an optimizer without EMA or before its first step.

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> opt = danlu.create_optimizer([("w", w)], "sgd+ema", lr=1.0, ema_momentum=0.5)
        >>> with ema_weights(opt) as applied:
        ...     applied
        False
        >>> w.grad = torch.ones(1); _ = opt.step(); w.grad = torch.ones(1); _ = opt.step()
        >>> with ema_weights(opt) as applied:   # (0.5 * -1 * 0.5 + 0.5 * -2) / (1 - 0.25)
        ...     applied, round(w.item(), 4)
        (True, -1.6667)
        >>> w.item()
        -2.0
    """
    if optimizer is None or not ema_ready(optimizer):
        yield False
        return
    inner: Any = unwrap_optimizer(optimizer)
    with inner.ema_weights(bias_correction=bias_correction):
        yield True


class EMATrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose ``evaluate`` and ``predict`` use the optimizer's EMA weights.

    Training is unchanged; every evaluation (the ones ``train()`` runs under ``eval_strategy`` and
    explicit ``evaluate()``/``predict()`` calls) swaps the averaged weights in for its duration and
    the training weights back after it. Without EMA (or before the first step) it is a plain
    ``Trainer``. Set ``ema_bias_correction = False`` to evaluate the raw (not bias-corrected) average.

    Checkpoints hold the training weights (so ``resume_from_checkpoint`` resumes exactly) and the
    optimizer state, which holds the averaged weights. With ``load_best_model_at_end=True`` the best
    checkpoint is chosen by the averaged weights' metric, and the model ends with *those* weights:
    the averaged weights of the best checkpoint, read from its ``optimizer.pt`` (the optimizer is
    left with that checkpoint's state). This needs the optimizer state in the checkpoints
    (``save_only_model=False``, the default). To export the averaged weights after training without
    it, use ``with ema_weights(trainer.optimizer): trainer.save_model(directory)``.

    Example:
        >>> issubclass(EMATrainer, transformers.Trainer)
        True
    """

    ema_bias_correction: bool = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.load_best_model_at_end and self.args.save_only_model:
            raise ValueError(
                "EMATrainer with load_best_model_at_end=True needs save_only_model=False: the averaged weights "
                "of the best checkpoint are in its optimizer state"
            )

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        with ema_weights(self.optimizer, self.ema_bias_correction):
            return super().evaluate(*args, **kwargs)

    def predict(self, *args: Any, **kwargs: Any) -> Any:
        with ema_weights(self.optimizer, self.ema_bias_correction):
            return super().predict(*args, **kwargs)

    def _load_best_model(self) -> None:
        super()._load_best_model()
        if not ema_ready(self.optimizer):
            return
        checkpoint = self.state.best_model_checkpoint
        path = os.path.join(checkpoint, transformers.trainer.OPTIMIZER_NAME) if checkpoint else ""
        if not os.path.isfile(path):
            warnings.warn(
                f"EMATrainer: the best checkpoint {checkpoint!r} has no optimizer state, which holds its averaged "
                "weights: the model holds that checkpoint's training weights, not the evaluated averaged ones",
                UserWarning,
                stacklevel=2,
            )
            return
        inner: Any = unwrap_optimizer(self.optimizer)
        inner.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        params = [p for group in inner.param_groups for p in group["params"]]
        with inner.ema_weights(bias_correction=self.ema_bias_correction):
            averaged = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, value in zip(params, averaged):
                p.copy_(value)
