"""PyTorch Lightning with a danlu optimizer, a OneCycle schedule, and validation on the EMA weights.

``configure_optimizers`` returns a danlu optimizer like any other; ``EMAWeightsCallback`` swaps the
averaged weights in for every validation (and test/predict) loop and the training weights back
after it.

Needs: pip install lightning
Run:   python examples/lightning_ema.py [--epochs 3]   (CPU, a few seconds)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TinyBert, token_task

import danlu
from danlu.integrations.lightning import EMAWeightsCallback


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 3e-3):
        super().__init__()
        self.model = TinyBert()
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.model(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        opt = danlu.create_optimizer(self, "adamw+ema", lr=self.lr, weight_decay_rate=0.01, ema_momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(n: int, seed: int, shuffle: bool) -> torch.utils.data.DataLoader:
    x, y = token_task(n, seed=seed)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32, shuffle=shuffle)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=1024)
    args = parser.parse_args(argv)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", callbacks=[EMAWeightsCallback()], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    module = Classifier()
    trainer.fit(module, loader(args.samples, 0, True), loader(256, 1, False))
    acc = float(trainer.callback_metrics["val_acc"])
    print(f"validation accuracy on the EMA weights after {args.epochs} epochs: {acc:.3f}")
    return {"val_acc": acc}


if __name__ == "__main__":
    main()
