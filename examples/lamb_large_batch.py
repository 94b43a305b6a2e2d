"""LAMB for large batches: AdamW and LAMB at batch 1024 over a range of learning rates.

LAMB (``danlu.Lamb`` = ``extend_with_layer_adaptation(extend_with_weight_decay(Adam))``) scales each
tensor's update by the trust ratio ``||w|| / ||update / lr||``: every tensor moves by about ``lr``
times its own norm, whatever the scale of its gradient, which is what large batches (few steps,
large lr) need. On this toy problem both reach about the same accuracy at their best lr; what the
sweep shows is where that lr is: LAMB's useful range is 0.1-0.3, where AdamW has already degraded.
LAMB also gets layer-wise lr decay here (``danlu.grouping.build_optimizer(..., layer_decay=0.8)``);
a OneCycleLR scheduler drives the base lr of both.

Run:  python examples/lamb_large_batch.py [--epochs 3]   (CPU, a few seconds)
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import danlu
from danlu.grouping import build_optimizer


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 10-class problem: the class is the argmax of a fixed random projection of the input."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=gen)
    proj = torch.randn(32, 10, generator=torch.Generator().manual_seed(123))
    return x, (x @ proj).argmax(dim=1)


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10))


def train(opt_factory, batch: int, epochs: int, x, y, dev_x, dev_y) -> tuple[float, int]:
    model = mlp()
    opt = opt_factory(model)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps, pct_start=0.2)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
        for i in range(len(x) // batch):
            idx = order[i * batch : (i + 1) * batch]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        acc = (model(dev_x).argmax(1) == dev_y).float().mean().item()
    return acc, steps


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--layer-decay", type=float, default=0.8)
    args = parser.parse_args(argv)
    x, y = data(args.samples, seed=0)
    dev_x, dev_y = data(2048, seed=1)
    results = {}
    batch = args.batch
    for name in ("adamw", "lamb"):
        for lr in (1e-2, 3e-2, 1e-1, 3e-1):
            if name == "adamw":
                factory = lambda m, lr=lr: danlu.create_optimizer(m, "adamw", lr=lr, weight_decay_rate=0.01)
            else:  # LAMB, with layer-wise lr decay (the two hidden blocks at 0.8 and 0.64 of the head's lr)
                factory = lambda m, lr=lr: build_optimizer(
                    m, "lamb", lr=lr, weight_decay_rate=0.01, layer_decay=args.layer_decay,
                    layer_id={r"^[01]\.": 0, r"^3\.": 1},
                )
            start = time.perf_counter()
            acc, steps = train(factory, batch, args.epochs, x, y, dev_x, dev_y)
            results[f"{name} lr={lr:g}"] = acc
            print(f"{name:6s} batch {batch}  lr {lr:<5g} {steps:4d} steps  dev accuracy {acc:.3f}  ({time.perf_counter() - start:.1f}s)")
    for name in ("adamw", "lamb"):
        best = max((k for k in results if k.startswith(name)), key=results.__getitem__)
        print(f"best {name}: {best} ({results[best]:.3f})")
    return results


if __name__ == "__main__":
    main()
