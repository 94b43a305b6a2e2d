"""PyTorch Lightning: configure_optimizers with danlu optimizers and schedulers, EMA weights for validation.

Skipped when lightning is not installed.
"""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

import danlu  # noqa: E402
from danlu.integrations.lightning import EMAWeightsCallback  # noqa: E402


class _Module(pl.LightningModule):
    def __init__(self, spec="adamw+ema", scheduler="onecycle", **hyper):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
        self.spec, self.scheduler_kind, self.hyper = spec, scheduler, hyper
        self.val_losses, self.val_weights, self.lrs = [], [], []

    def training_step(self, batch, _):
        x, y = batch
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.val_losses.append(loss.item())
        self.val_weights.append(self.net[0].weight.detach().clone())
        self.log("val_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = danlu.create_optimizer(self, self.spec, **self.hyper)
        if self.scheduler_kind == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=self.trainer.estimated_stepping_batches)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss", "interval": "epoch"}}


def _loader(n=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    y = x.sum(dim=1, keepdim=True)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _trainer(callbacks=(), **kw):
    base = dict(
        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        max_epochs=2, num_sanity_val_steps=1, limit_val_batches=1,
    )
    base.update(kw)
    return pl.Trainer(callbacks=list(callbacks), **base)


def test_configure_optimizers_with_one_cycle_and_ema_validation():
    module = _Module("adamw+ema", lr=1e-3, weight_decay_rate=0.01, ema_momentum=0.9, betas=(0.9, 0.999))
    trainer = _trainer([EMAWeightsCallback()])
    trainer.fit(module, _loader(), _loader(seed=1))
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["applied_steps"] == 8
    # OneCycleLR drove the lr (and cycled Adam's beta1) of the danlu optimizer
    assert module.lrs[0] == pytest.approx(1e-2 / 25) and max(module.lrs) > 5e-3
    # validation 0 is the sanity check (training weights, no step yet); the others ran on EMA weights
    assert len(module.val_weights) == 3
    with opt.ema_weights():
        ema_now = module.net[0].weight.detach().clone()
    torch.testing.assert_close(module.val_weights[-1], ema_now)
    assert not torch.equal(module.net[0].weight, ema_now)  # training weights restored after validation
    # trainer.validate() and test() use the EMA weights too
    module.val_weights.clear()
    trainer.validate(module, _loader(seed=1), verbose=False)
    torch.testing.assert_close(module.val_weights[-1], ema_now)


def test_reduce_on_plateau_and_lookahead():
    module = _Module("radam+lookahead", scheduler="plateau", lr=1e-3, steps_per_slow_update=2)
    trainer = _trainer(max_epochs=3)
    trainer.fit(module, _loader(), _loader(seed=1))
    opt = trainer.optimizers[0]
    assert opt.param_groups[0]["applied_steps"] == 12
    assert all("lookahead.slow" in opt.state[p] for p in module.parameters())


def test_accumulate_grad_batches_calls_step_once_per_accumulation():
    module = _Module("adamw+ema", lr=1e-3)
    trainer = _trainer([EMAWeightsCallback()], accumulate_grad_batches=2, max_epochs=1)
    trainer.fit(module, _loader(), _loader(seed=1))
    assert trainer.optimizers[0].param_groups[0]["applied_steps"] == 2
