"""Lazy embedding updates with sparse gradients: only the rows a batch uses are touched.

A matrix-factorization recommender: ``score(user, item) = <U[user], V[item]>`` with 20,000 users and
5,000 items, trained on a few thousand observed pairs. Each batch touches a handful of rows.

* ``nn.Embedding(..., sparse=True)`` makes the gradient a sparse COO tensor (the touched rows only);
* ``danlu.LazyAdam`` takes sparse gradients and updates the moments and parameters of those rows
  only (TensorFlow Addons' LazyAdam); rows absent from the batch keep their weights *and* moments.
* For dense gradients, ``extend_with_lazy_optimization`` (bert4keras) masks only the *parameter*
  update of all-zero-gradient rows of the named tensors; the Adam moments of those rows still decay.

The script checks, at the last step, that the user rows absent from that batch are unchanged under
both, whereas plain Adam keeps moving every row that was ever seen (its moments are non-zero).

Run:  python examples/lazy_embeddings.py [--steps 200]   (CPU, a few seconds)
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

import danlu


class MF(nn.Module):
    def __init__(self, users: int, items: int, dim: int, sparse: bool):
        super().__init__()
        torch.manual_seed(0)
        self.user = nn.Embedding(users, dim, sparse=sparse)
        self.item = nn.Embedding(items, dim, sparse=sparse)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)

    def forward(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return (self.user(u) * self.item(i)).sum(-1)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    n = 4000
    users = torch.randint(0, args.users, (n,), generator=gen)
    items = torch.randint(0, args.items, (n,), generator=gen)
    ratings = torch.randn(n, generator=gen).sign()

    runs = {
        "LazyAdam, sparse gradients": (True, lambda m: danlu.LazyAdam(m.parameters(), lr=1e-2)),
        "Adam + extend_with_lazy_optimization, dense gradients": (
            False,
            lambda m: danlu.create_optimizer(m, "adam+lazy", lr=1e-2, include_in_lazy_optimization=[r"^(user|item)\."]),
        ),
        "plain Adam, dense gradients": (False, lambda m: danlu.Adam(m.parameters(), lr=1e-2)),
    }
    results = {}
    for label, (sparse, make_opt) in runs.items():
        model = MF(args.users, args.items, 16, sparse)
        opt = make_opt(model)
        start = time.perf_counter()
        for step in range(args.steps):
            idx = torch.randint(0, n, (args.batch,), generator=torch.Generator().manual_seed(step))
            before = model.user.weight.detach().clone()
            loss = nn.functional.soft_margin_loss(model(users[idx], items[idx]), ratings[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        elapsed = time.perf_counter() - start
        with torch.no_grad():
            full = nn.functional.soft_margin_loss(model(users, items), ratings).item()
        absent = torch.ones(args.users, dtype=torch.bool)
        absent[users[idx]] = False  # rows not in the last batch
        unchanged = torch.equal(model.user.weight[absent], before[absent])
        results[label] = full
        results[f"{label}: rows absent from the last batch unchanged"] = float(unchanged)
        print(f"{label:55s} train loss {full:.4f}  rows absent from the last batch unchanged: {unchanged}  ({elapsed:.2f}s)")
    return results


if __name__ == "__main__":
    main()
