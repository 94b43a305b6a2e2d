"""A plain training loop with ``torch.compile``: of the model, and of the optimizer step.

* Build the optimizer from the *original* model (``create_optimizer(model, ...)``), then compile
  the model: the compiled wrapper's parameter names get an ``_orig_mod.`` prefix, which anchored
  name patterns (``^bias``) would not match.
* ``torch.compile(opt.step)`` compiles the step: the counters are tensors and the learning rates
  written by an LR scheduler are graph inputs, so it traces to at most two graphs.

Run:  python examples/compile_loop.py [--steps 30] [--backend inductor]
      (the default inductor backend needs a C++ compiler and spends tens of seconds compiling on
      a small CPU; ``--backend aot_eager`` checks the tracing quickly)
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import danlu


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--backend", default="inductor")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.LayerNorm(64), nn.GELU(), nn.Linear(64, 1))
    opt = danlu.create_optimizer(model, "adamw+lookahead+ema", lr=1e-2, weight_decay_rate=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    compiled_model = torch.compile(model, backend=args.backend)

    optimizer_step = torch.compile(opt.step, backend=args.backend)

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 1, generator=gen)
    start = time.perf_counter()
    losses = []
    for step in range(args.steps):
        x = torch.randn(64, 16, generator=gen)
        loss = nn.functional.mse_loss(compiled_model(x), x @ w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        optimizer_step()
        sched.step()
        losses.append(loss.item())
        if step == 0:
            print(f"first step (compiles): {time.perf_counter() - start:.1f}s")
    with opt.ema_weights(), torch.no_grad():
        x = torch.randn(256, 16, generator=gen)
        ema_loss = nn.functional.mse_loss(model(x), x @ w).item()
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}; EMA weights {ema_loss:.3f}; {time.perf_counter() - start:.1f}s total")
    return {"first_loss": losses[0], "last_loss": losses[-1], "ema_loss": ema_loss}


if __name__ == "__main__":
    main()
