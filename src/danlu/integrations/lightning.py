"""PyTorch Lightning with danlu optimizers.

A danlu optimizer is an ordinary ``torch.optim.Optimizer``: return it (and a scheduler) from
``configure_optimizers`` as usual::

    def configure_optimizers(self):
        opt = danlu.create_optimizer(self, "adamw+ema", lr=1e-3, weight_decay_rate=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

and add :class:`EMAWeightsCallback` to the ``Trainer`` to validate, test and predict with the EMA
weights. Lightning's ``accumulate_grad_batches`` calls ``optimizer.step()`` once per accumulated
batch: use it or ``extend_with_gradient_accumulation``, not both. Works with ``lightning``
(``import lightning.pytorch``) and with the older ``pytorch_lightning`` package.
"""

from __future__ import annotations

import importlib
from typing import Any

from danlu.integrations import ema_ready, unwrap_optimizer


def _lightning() -> Any:
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("danlu.integrations.lightning needs lightning: pip install lightning")


Callback: Any = _lightning().Callback

__all__ = ["EMAWeightsCallback"]


class EMAWeightsCallback(Callback):
    """Validate, test and predict with the EMA weights of the trainer's danlu optimizers.

    Before each validation (and test, and predict) loop, every optimizer of the trainer that has
    ``extend_with_exponential_moving_average`` and has applied a step gets ``apply_ema_weights()``;
    after the loop, ``reset_old_weights()`` puts the training weights back, so training continues
    from them. Lightning's sanity-check validation (before any step) runs with the training weights.

    Args:
        bias_correction: passed to ``apply_ema_weights`` (divide the average by ``1 - momentum**t``).
        validate: use the EMA weights in validation loops (the sanity check excepted).
        test: use them in test loops.
        predict: use them in predict loops.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(callbacks=[EMAWeightsCallback()], logger=False, enable_progress_bar=False,
        ...                      enable_checkpointing=False, enable_model_summary=False)
        >>> isinstance(trainer.callbacks[0], EMAWeightsCallback)
        True
    """

    def __init__(self, bias_correction: bool = True, *, validate: bool = True, test: bool = True, predict: bool = True):
        super().__init__()
        self.bias_correction = bias_correction
        self.loops = {"validate": validate, "test": test, "predict": predict}
        self._applied: list[Any] = []

    def _apply(self, trainer: Any, loop: str) -> None:
        if not self.loops[loop] or self._applied:
            return
        for optimizer in trainer.optimizers:
            if ema_ready(optimizer):
                inner: Any = unwrap_optimizer(optimizer)
                inner.apply_ema_weights(bias_correction=self.bias_correction)
                self._applied.append(inner)

    def _reset(self) -> None:
        while self._applied:
            self._applied.pop().reset_old_weights()

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking:
            self._apply(trainer, "validate")

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        self._reset()

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._apply(trainer, "test")

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        self._reset()

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._apply(trainer, "predict")

    def on_predict_end(self, trainer: Any, pl_module: Any) -> None:
        self._reset()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._reset()
