"""Where Muon's step time goes on the bert set: its Adam part and its Newton-Schulz part, each against torch's.

``python benchmarks/muon_parts.py [--rounds 9] [--parts step,adam,muon,ns]`` (1 thread). Each part is
stepped alone, danlu's and torch's interleaved round by round on the same tensors; the figures are
medians of the per-round ratios, by wall clock and by the thread's CPU time (which a shared machine
disturbs less: another process's work does not count, only what it does to the caches and the
memory bus).

* ``step``: the whole step, ``danlu.Muon`` against ``torch.optim.Muon`` + ``torch.optim.Adam(foreach=True)``
  (the bench's pair);
* ``adam``: ``danlu.Muon`` over the embeddings and the vectors (all Adam part) against
  ``torch.optim.Adam(foreach=True)`` with the same betas and eps;
* ``muon``: ``danlu.Muon`` over the 24 hidden matrices against ``torch.optim.Muon``;
* ``ns``: :func:`danlu.optimizers.muon.newton_schulz` of one matrix of each shape against torch's own
  Newton-Schulz function (bfloat16, 5 steps).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import danlu
from danlu.bench import LR, _muon_split, _TorchMuonWithAdam, parameter_set
from danlu.optimizers.muon import newton_schulz

COEFFICIENTS = (3.4445, -4.775, 2.0315)


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - w0, time.thread_time() - c0


def _compare(title: str, pair: dict[str, Callable[[], object]], rounds: int) -> None:
    for fn in pair.values():
        fn()  # warm-up: state creation
    wall: dict[str, list[float]] = {name: [] for name in pair}
    cpu: dict[str, list[float]] = {name: [] for name in pair}
    names = list(pair)
    for r in range(rounds):
        for name in names[r % 2 :] + names[: r % 2]:
            w, c = _timed(pair[name])
            wall[name].append(w)
            cpu[name].append(c)
    ours, theirs = names
    print(f"{title}")
    for name in names:
        print(
            f"  {name:28s} wall median {statistics.median(wall[name]):.3f} s (min {min(wall[name]):.3f})"
            f"   cpu median {statistics.median(cpu[name]):.3f} s (min {min(cpu[name]):.3f})"
        )
    for label, series in (("wall", wall), ("cpu", cpu)):
        ratios = sorted(a / b for a, b in zip(series[ours], series[theirs]))
        print(
            f"  {ours} / {theirs} per round ({label}): median {statistics.median(ratios):.3f}, "
            f"{ratios[0]:.3f} to {ratios[-1]:.3f}"
        )


def _torch_newton_schulz() -> Callable[..., torch.Tensor]:
    from torch.optim import _muon

    return _muon._zeropower_via_newtonschulz  # type: ignore[attr-defined,no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--parts", default="step,adam,muon,ns")
    args = parser.parse_args()
    torch.set_num_threads(1)
    named = parameter_set("bert")
    matrices, rest = _muon_split(named)
    ids = {id(p) for p in matrices}
    adam_named = [(n, p) for n, p in named if id(p) not in ids]
    matrix_named = [(n, p) for n, p in named if id(p) in ids]
    parts = args.parts.split(",")
    if "step" in parts:
        whole = danlu.Muon(named, lr=LR, exclude_from_muon=["embeddings"])
        pair = _TorchMuonWithAdam(named)
        _compare(
            f"The whole step ({len(named)} tensors)",
            {"danlu.Muon": whole.step, "torch.Muon+Adam": pair.step},
            max(3, args.rounds // 2),
        )
    if "adam" in parts:
        ours = danlu.Muon(adam_named, lr=LR, exclude_from_muon=["embeddings"])
        theirs = torch.optim.Adam(rest, lr=LR, betas=(0.9, 0.95), eps=1e-8, foreach=True)
        count = sum(p.numel() for p in rest)
        _compare(
            f"Adam part ({len(rest)} tensors, {count / 1e6:.1f} M parameters)",
            {"danlu.Muon": ours.step, "torch.Adam(foreach)": theirs.step},
            args.rounds,
        )
    if "muon" in parts:
        ours = danlu.Muon(matrix_named, lr=LR)
        theirs = torch.optim.Muon(matrices, lr=LR, weight_decay=0.0)
        _compare(
            f"Newton-Schulz part ({len(matrices)} matrices)",
            {"danlu.Muon": ours.step, "torch.Muon": theirs.step},
            max(3, args.rounds // 2),
        )
    if "ns" in parts:
        torch_ns = _torch_newton_schulz()
        for shape in ((768, 768), (3072, 768), (768, 3072)):
            g = torch.randn(shape)
            _compare(
                f"newton_schulz of one {shape[0]} x {shape[1]} matrix",
                {
                    "danlu": lambda g=g: newton_schulz(g, COEFFICIENTS, 5, 1e-7, torch.bfloat16),
                    "torch": lambda g=g: torch_ns(g, COEFFICIENTS, 5, 1e-7),
                },
                args.rounds,
            )


if __name__ == "__main__":
    main()
