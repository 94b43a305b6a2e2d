"""Hugging Face ``transformers.Trainer`` with a danlu optimizer and EMA weights for evaluation.

``Trainer(optimizers=(optimizer, scheduler))`` takes any ``torch.optim.Optimizer``;
``danlu.integrations.transformers.create_optimizer_and_scheduler`` builds both from the model and
the ``TrainingArguments`` (learning_rate, weight_decay, adam_beta1/2, adam_epsilon, warm-up and
lr_scheduler_type), with no weight decay on biases and LayerNorm weights. ``EMATrainer`` evaluates
with the EMA weights of an ``...+ema`` optimizer. The model is a tiny randomly initialized BERT
(no download).

Needs: pip install transformers accelerate
Run:   python examples/hf_trainer.py [--steps 100]   (CPU, a few seconds)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import token_task

from danlu.integrations.transformers import EMATrainer, create_optimizer_and_scheduler


class Dataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.ids, self.labels = token_task(n, seed=seed)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def accuracy(pred: transformers.EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((pred.predictions.argmax(-1) == pred.label_ids).mean())}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--spec", default="adamw+ema", help="a danlu.create_optimizer spec")
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    model = transformers.BertForSequenceClassification(config)
    with tempfile.TemporaryDirectory() as out:
        training_args = transformers.TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=32, per_device_eval_batch_size=256,
            learning_rate=args.lr, weight_decay=0.01, warmup_steps=max(1, args.steps // 10), lr_scheduler_type="linear",
            eval_strategy="steps", eval_steps=max(1, args.steps // 2), logging_steps=max(1, args.steps // 4),
            save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        )
        optimizer, scheduler = create_optimizer_and_scheduler(
            model, training_args, args.steps, args.spec, ema_momentum=0.9
        )
        trainer = EMATrainer(
            model=model, args=training_args, train_dataset=Dataset(32 * args.steps, 0), eval_dataset=Dataset(256, 1),
            optimizers=(optimizer, scheduler), compute_metrics=accuracy,
        )
        trainer.train()
        metrics = trainer.evaluate()  # with the EMA weights
        print(f"{type(optimizer).__name__}: eval accuracy (EMA weights) {metrics['eval_accuracy']:.3f}")
    return {"eval_accuracy": metrics["eval_accuracy"], "eval_loss": metrics["eval_loss"]}


if __name__ == "__main__":
    main()
