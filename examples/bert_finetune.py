"""BERT-style fine-tuning: AdamW + warm-up + gradient accumulation + EMA weights for evaluation.

The bert4keras recipe, in a plain PyTorch loop:

* AdamW (decoupled weight decay, none for biases and LayerNorm weights: ``create_optimizer`` groups them);
* a linear warm-up then decay (``extend_with_piecewise_linear_lr``; a torch LR scheduler would do as well);
* gradient accumulation: micro-batches of 8, one optimizer step every 4 calls (an effective batch of 32);
* an exponential moving average of the weights, swapped in for evaluation with ``opt.ema_weights()``.

Run:  python examples/bert_finetune.py [--steps 60]   (CPU, a few seconds)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import TinyBert, accuracy, token_task

import danlu


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (each = --accum micro-batches)")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    train_x, train_y = token_task(args.steps * args.accum * args.micro_batch, seed=0)
    dev_x, dev_y = token_task(256, seed=1)
    model = TinyBert()

    warmup = max(1, args.steps // 10)
    opt = danlu.create_optimizer(
        model,
        "adamw+piecewise_linear_lr+gradient_accumulation+ema",
        lr=args.lr,
        weight_decay_rate=0.01,
        lr_schedule={warmup: 1.0, args.steps: 0.1},  # counted in applied steps, not micro-batches
        grad_accum_steps=args.accum,
        ema_momentum=0.9,
    )
    start = time.perf_counter()
    losses = []
    for call, (x, y) in enumerate(zip(train_x.split(args.micro_batch), train_y.split(args.micro_batch)), start=1):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()  # buffers 3 calls out of 4; the 4th applies AdamW with the mean gradient
        losses.append(loss.item())
        if call % (10 * args.accum) == 0:
            print(f"step {opt.param_groups[0]['applied_steps']:4d}  loss {sum(losses[-40:]) / len(losses[-40:]):.4f}")

    raw = accuracy(model, dev_x, dev_y)
    with opt.ema_weights():  # evaluate (or save) the averaged weights
        ema = accuracy(model, dev_x, dev_y)
    elapsed = time.perf_counter() - start
    print(f"dev accuracy: training weights {raw:.3f}, EMA weights {ema:.3f}  ({elapsed:.1f}s)")
    return {"first_loss": losses[0], "last_loss": sum(losses[-8:]) / 8, "accuracy": raw, "ema_accuracy": ema,
            "applied_steps": float(opt.param_groups[0]["applied_steps"])}


if __name__ == "__main__":
    main()
