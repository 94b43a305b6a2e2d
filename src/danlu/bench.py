"""``danlu bench``: optimizer step time against torch.optim and installed peers, at the memory-bandwidth limit.

An optimizer step is memory-bound: it reads and writes parameters, gradients and state and does little
arithmetic. For every implementation this measures, on one parameter set and in one run:

* the median step time over ``--rounds`` rounds, implementations interleaved round-robin in batches
  that each include the reference, torch's fused AdamW, and the bandwidth probes;
* the ratio to torch's fused AdamW of the same batch;
* the bytes the algorithm must move per parameter (the traffic model, :data:`TRAFFIC`), the memory
  bandwidth measured in the same batch (in-place streams over the same tensors), and the efficiency
  ``bytes moved / time / bandwidth``;
* optimizer state bytes per parameter, the time of the first step (state creation, kernel build or
  load, compilation), and the peak extra memory of a step (live tensors allocated during the step,
  tracked by a ``TorchDispatchMode``; native kernels allocate nothing).

Results go to JSON and to a Markdown table (``--out``). Peers (timm, pytorch-optimizer, transformers,
HeavyBall) are measured when importable and skipped otherwise.

Usage: ``danlu bench [--sets bert,many-small,one-big] [--scale 0.1] [--rounds 7] [--only adamw,lamb]``
(``python benchmarks/run.py`` is the same).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["main", "add_arguments", "run_args", "run", "parameter_set", "TRAFFIC", "PeakMemory"]

REFERENCE = "torch.AdamW[fused]"

# ---------------------------------------------------------------------------------------- parameter sets


def _bert_shapes(
    layers: int = 4, hidden: int = 768, inter: int = 3072, vocab: int = 30522, positions: int = 512
) -> list[tuple[str, tuple[int, ...]]]:
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("embeddings.word_embeddings.weight", (vocab, hidden)),
        ("embeddings.position_embeddings.weight", (positions, hidden)),
        ("embeddings.token_type_embeddings.weight", (2, hidden)),
        ("embeddings.LayerNorm.weight", (hidden,)),
        ("embeddings.LayerNorm.bias", (hidden,)),
    ]
    for i in range(layers):
        pre = f"encoder.layer.{i}."
        for part in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes += [(pre + part + ".weight", (hidden, hidden)), (pre + part + ".bias", (hidden,))]
        shapes += [(pre + "attention.output.LayerNorm.weight", (hidden,)), (pre + "attention.output.LayerNorm.bias", (hidden,))]
        shapes += [(pre + "intermediate.dense.weight", (inter, hidden)), (pre + "intermediate.dense.bias", (inter,))]
        shapes += [(pre + "output.dense.weight", (hidden, inter)), (pre + "output.dense.bias", (hidden,))]
        shapes += [(pre + "output.LayerNorm.weight", (hidden,)), (pre + "output.LayerNorm.bias", (hidden,))]
    return shapes


def _many_small_shapes():
    kinds = [(128, 32), (32, 128), (4096,), (64, 64)]
    return [(f"block.{i}.weight", kinds[i % 4]) for i in range(2000)]


PARAMETER_SETS: dict[str, Callable[[], list[tuple[str, tuple[int, ...]]]]] = {
    "bert": _bert_shapes,  # BERT-base encoder shapes, 4 layers: 69 tensors, 52.2 M parameters
    "many-small": _many_small_shapes,  # 2000 tensors of 4096 elements: 8.2 M parameters
    "one-big": lambda: [("weight", (8192, 4096))],  # one tensor of 32 Mi elements
}


def parameter_set(
    name: str, scale: float = 1.0, dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[tuple[str, torch.nn.Parameter]]:
    """Named parameters (with fixed gradients) of a set; ``scale`` shrinks the first dimension of every tensor."""
    gen = torch.Generator().manual_seed(seed)
    named = []
    for pname, shape in PARAMETER_SETS[name]():
        shape = (max(1, round(shape[0] * scale)), *shape[1:])
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, dtype=dtype) * 0.02)
        p.grad = torch.randn(shape, generator=gen, dtype=dtype) * 1e-3
        named.append((pname, p))
    return named


# ---------------------------------------------------------------------------------------- traffic model
# Array transfers per parameter per step (a read or a write of one parameter-sized array counts 1):
# p, g, state read; p, state written. Bytes per parameter = transfers * element size.

TRAFFIC: dict[str, float] = {
    "sgd": 3,  # read p, g; write p
    "sgd_momentum": 5,  # + buffer read/write
    "adagrad": 5,
    "adadelta": 7,
    "rmsprop": 5,
    "adam": 7,  # read p, g, m, v; write p, m, v
    "adamax": 7,  # read p, g, m, u; write p, m, u
    "lion": 5,
    "lamb": 10,  # pass 1: read p, g, m, v, write m, v (norms); pass 2: read p, m, v, write p
    "lamb_pure": 11,  # the same with a pass 1 that writes nothing (4 + 7)
}


def muon_transfers(shapes: Sequence[tuple[int, ...]], adam_below: int = 2) -> float:
    """Muon over the matrices (read p, g, buffer; write buffer, p: 5) and Adam over the rest (7), weighted by size.

    The Newton-Schulz products are compute, not traffic: Muon's step time is set by the matmuls, and the
    efficiency column of a Muon row is far below 1 by nature. Embeddings count as Adam (the bench's Muon
    sends them there, as ``create_optimizer(model, "muon")`` does).
    """
    total = weighted = 0.0
    for index, shape in enumerate(shapes):
        n = math.prod(shape)
        total += n
        weighted += n * (7 if len(shape) < adam_below or index in _EMBEDDING_INDICES.get(len(shapes), ()) else 5)
    return weighted / total if total else 0.0


_EMBEDDING_INDICES: dict[int, tuple[int, ...]] = {}
"""{number of tensors of a set: indices of its embedding tensors}, filled by :func:`_muon_split`."""


def _muon_split(named: list[tuple[str, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
    """(matrices for Newton-Schulz, the rest for Adam): embeddings and tensors below 2-D take Adam."""
    _EMBEDDING_INDICES[len(named)] = tuple(i for i, (n, _) in enumerate(named) if "embeddings" in n)
    matrices = [p for n, p in named if p.dim() >= 2 and "embeddings" not in n]
    rest = [p for n, p in named if not (p.dim() >= 2 and "embeddings" not in n)]
    return matrices, rest


PAIRED: dict[str, str] = {"muon": "torch.Muon+Adam"}
"""{algorithm: the torch implementation its other rows are also paired with, round by round, when in the same batch}."""


class _TorchMuonWithAdam:
    """torch.optim.Muon over the matrices and torch.optim.Adam (foreach) over the rest, stepped together."""

    def __init__(self, named: list[tuple[str, Tensor]]) -> None:
        matrices, rest = _muon_split(named)
        self.muon = torch.optim.Muon(matrices, lr=LR, weight_decay=0.0)
        self.adam = torch.optim.Adam(rest, lr=LR, betas=(0.9, 0.95), eps=1e-8, foreach=True)
        self.param_groups = self.muon.param_groups + self.adam.param_groups
        self.state = {**self.muon.state, **self.adam.state}

    def step(self) -> None:
        self.muon.step()
        self.adam.step()
        self.state = {**self.muon.state, **self.adam.state}


def adafactor_transfers(shapes: Sequence[tuple[int, ...]], min_dim: int = 128, clip: bool = True, scale: bool = True) -> float:
    """Adafactor (beta1 = 0): factored 2-D tensors g+p / g / g+p+p = 6 passes, others 1 + 3 + 4 = 8 (weighted by size)."""
    total = weighted = 0.0
    for shape in shapes:
        n = math.prod(shape)
        dims = sorted(shape)
        factored = len(shape) >= 2 and dims[-2] >= min_dim
        if factored:
            t = 1 + (1 if scale else 0) + (1 if clip else 0) + 3
        else:
            t = (1 if scale else 0) + (3 if clip else 0) + (4 if clip else 6)
        total += n
        weighted += n * t
    return weighted / total


# ---------------------------------------------------------------------------------------- peak memory


class PeakMemory:
    """Context manager: peak bytes of tensor storages allocated, and still alive, inside the block (CPU and CUDA).

    Storages that an op returns and that none of its inputs shares are counted from their creation until
    they are freed, so temporaries count as long as they live. Native kernels called through ctypes allocate
    nothing and are invisible here; torch's own fused kernels are ops and are seen.
    """

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def __enter__(self) -> PeakMemory:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        seen: dict[int, int] = {}

        def free(key: int, n: int) -> None:
            if seen.pop(key, None) is not None:
                tracker.live -= n

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                kwargs = kwargs or {}
                inputs = {
                    t.untyped_storage().data_ptr()
                    for t in tree_flatten((args, kwargs))[0]
                    if isinstance(t, Tensor) and t.layout is torch.strided
                }
                out = func(*args, **kwargs)
                for t in tree_flatten(out)[0]:
                    if not isinstance(t, Tensor) or t.layout is not torch.strided:
                        continue
                    storage = t.untyped_storage()
                    key, n = storage.data_ptr(), storage.nbytes()
                    if n == 0 or key in inputs or key in seen:
                        continue
                    seen[key] = n
                    tracker.live += n
                    tracker.peak = max(tracker.peak, tracker.live)
                    weakref.finalize(storage, free, key, n)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)


# ---------------------------------------------------------------------------------------- implementations


@dataclass
class Impl:
    name: str
    family: str  # danlu, torch, timm, pytorch-optimizer, transformers, heavyball
    algorithm: str  # the comparison group (adamw, lamb, ...)
    make: Callable[[list[tuple[str, torch.nn.Parameter]]], torch.optim.Optimizer]
    transfers: Callable[[list[tuple[int, ...]]], float]
    calls: int = 1  # step() calls per measured step (gradient accumulation: k)
    note: str = ""
    step: Callable[[torch.optim.Optimizer], None] | None = None


def _t(n: float) -> Callable[[list[tuple[int, ...]]], float]:
    return lambda shapes: float(n)


LR = 1e-6  # small: parameters stay put over hundreds of steps


def _plain(named):
    return [p for _, p in named]


def danlu_impls() -> list[Impl]:
    import danlu

    d = danlu
    la_adamw = d.extend_with_lookahead(d.AdamW)
    ema_adamw = d.extend_with_exponential_moving_average(d.AdamW)
    acc_adamw = d.extend_with_gradient_accumulation(d.AdamW)
    pw_adamw = d.extend_with_piecewise_linear_lr(d.AdamW)
    la_ema_adamw = d.extend_with_exponential_moving_average(la_adamw)
    wd_lion = d.extend_with_weight_decay(d.Lion)
    sf_adamw = d.extend_with_schedule_free(d.AdamW)
    clip_adamw = d.extend_with_gradient_clipping(d.AdamW)
    impls = [
        Impl("danlu.Adam", "danlu", "adam", lambda nm: d.Adam(nm, lr=LR), _t(7)),
        Impl("danlu.AdamW", "danlu", "adamw", lambda nm: d.AdamW(nm, lr=LR, weight_decay_rate=0.01), _t(7)),
        Impl("danlu.Lamb", "danlu", "lamb", lambda nm: d.Lamb(nm, lr=LR, weight_decay_rate=0.01), _t(10)),
        Impl("danlu.Ranger", "danlu", "ranger", lambda nm: d.Ranger(nm, lr=LR), _t(7 + 2 / 5)),
        Impl("danlu.Lookahead+AdamW", "danlu", "lookahead+adamw", lambda nm: la_adamw(nm, lr=LR), _t(7 + 2 / 5)),
        Impl("danlu.EMA+AdamW", "danlu", "ema+adamw", lambda nm: ema_adamw(nm, lr=LR), _t(9)),
        Impl("danlu.Lookahead+EMA+AdamW", "danlu", "lookahead+ema+adamw", lambda nm: la_ema_adamw(nm, lr=LR), _t(9 + 2 / 5)),
        Impl(
            "danlu.Accum2+AdamW",
            "danlu",
            "accum+adamw",
            lambda nm: acc_adamw(nm, lr=LR, grad_accum_steps=2),
            _t(7 + 3 * 2),
            calls=2,
            note="2 calls (one buffering, one applying) per step",
        ),
        Impl(
            "danlu.PiecewiseLR+AdamW",
            "danlu",
            "piecewise+adamw",
            lambda nm: pw_adamw(nm, lr=LR, lr_schedule={1000: 1.0, 2000: 0.1}),
            _t(7),
        ),
        Impl(
            "danlu.Clip+AdamW",
            "danlu",
            "clip+adamw",
            lambda nm: clip_adamw(nm, lr=LR, weight_decay_rate=0.01, global_clipnorm=1e-3),
            _t(7 + 1),
            note="global_clipnorm always active: + one read of g for the norm; the factor folds into the kernel",
        ),
        Impl("danlu.NAdam", "danlu", "nadam", lambda nm: d.NAdam(nm, lr=LR), _t(7)),
        Impl("danlu.RAdam", "danlu", "radam", lambda nm: d.RAdam(nm, lr=LR), _t(7)),
        Impl("danlu.Adafactor", "danlu", "adafactor", lambda nm: d.Adafactor(nm, lr=LR), adafactor_transfers),
        Impl("danlu.Lion", "danlu", "lion", lambda nm: d.Lion(nm, lr=LR), _t(5)),
        Impl("danlu.Adamax", "danlu", "adamax", lambda nm: d.Adamax(nm, lr=LR), _t(7)),
        Impl("danlu.Lion+WD", "danlu", "lion+wd", lambda nm: wd_lion(nm, lr=LR, weight_decay_rate=0.01), _t(5)),
        Impl("danlu.SGD", "danlu", "sgd", lambda nm: d.SGD(nm, lr=LR), _t(3)),
        Impl("danlu.SGD[momentum]", "danlu", "sgd_momentum", lambda nm: d.SGD(nm, lr=LR, momentum=0.9), _t(5)),
        Impl("danlu.Adagrad", "danlu", "adagrad", lambda nm: d.Adagrad(nm, lr=LR), _t(5)),
        Impl("danlu.Adadelta", "danlu", "adadelta", lambda nm: d.Adadelta(nm, lr=LR), _t(7)),
        Impl("danlu.RMSprop", "danlu", "rmsprop", lambda nm: d.RMSprop(nm, lr=LR), _t(5)),
        Impl("danlu.Muon", "danlu", "muon", lambda nm: d.Muon(nm, lr=LR, exclude_from_muon=["embeddings"]), muon_transfers),
        Impl(
            "danlu.ScheduleFree+AdamW",
            "danlu",
            "schedule_free+adamw",
            lambda nm: sf_adamw(nm, lr=LR, weight_decay_rate=0.01),
            _t(7 + 10),
            note="base step on z: + copy z in (2), z out (2), x update (3), y out (3)",
        ),
    ]
    pure = [
        Impl("danlu.AdamW[foreach]", "danlu", "adamw", lambda nm: d.AdamW(nm, lr=LR, foreach=True), _t(7)),
        Impl("danlu.Lamb[foreach]", "danlu", "lamb", lambda nm: d.Lamb(nm, lr=LR, foreach=True), _t(10)),
        Impl(
            "danlu.Adafactor[foreach]", "danlu", "adafactor", lambda nm: d.Adafactor(nm, lr=LR, foreach=True), adafactor_transfers
        ),
        Impl(
            "danlu.Muon[single]",
            "danlu",
            "muon",
            lambda nm: d.Muon(nm, lr=LR, exclude_from_muon=["embeddings"], foreach=False),
            muon_transfers,
            note="per-tensor Newton-Schulz (no batching)",
        ),
    ]
    return impls + pure


def torch_impls(compile_peers: bool) -> list[Impl]:
    o = torch.optim
    impls: list[Impl] = []

    def variants(name: str, cls: type, algorithm: str, transfers: float, kinds: Sequence[str], **kw: Any) -> None:
        for kind in kinds:
            flag = {"fused": {"fused": True}, "foreach": {"foreach": True}, "single": {"foreach": False}}[kind]
            impls.append(
                Impl(
                    f"torch.{name}[{kind}]",
                    "torch",
                    algorithm,
                    lambda nm, c=cls, f=flag: c(_plain(nm), lr=LR, **kw, **f),  # type: ignore[misc]
                    _t(transfers),
                )
            )

    variants("AdamW", o.AdamW, "adamw", 7, ("fused", "foreach", "single"), weight_decay=0.01)
    variants("Adam", o.Adam, "adam", 7, ("fused", "foreach"))
    variants("SGD", o.SGD, "sgd_momentum", 5, ("fused", "foreach", "single"), momentum=0.9)
    variants("Adagrad", o.Adagrad, "adagrad", 5, ("fused", "foreach"))
    variants("Adadelta", o.Adadelta, "adadelta", 7, ("foreach",))
    variants("RMSprop", o.RMSprop, "rmsprop", 5, ("foreach",))
    variants("NAdam", o.NAdam, "nadam", 7, ("foreach", "single"))
    variants("RAdam", o.RAdam, "radam", 7, ("foreach", "single"))
    variants("Adamax", o.Adamax, "adamax", 7, ("foreach", "single"))
    if hasattr(o, "Adafactor"):
        impls.append(
            Impl(
                "torch.Adafactor[foreach]",
                "torch",
                "adafactor",
                lambda nm: o.Adafactor(_plain(nm), lr=LR, foreach=True),
                adafactor_transfers,
            )
        )
    if hasattr(o, "Muon"):
        impls.append(
            Impl(
                "torch.Muon+Adam",
                "torch",
                "muon",
                _TorchMuonWithAdam,  # type: ignore[arg-type]
                muon_transfers,
                note="torch.optim.Muon on the matrices, torch.optim.Adam (foreach) on the rest",
            )
        )
    if compile_peers:

        def compiled_step(opt: torch.optim.Optimizer) -> None:
            fn = opt.__dict__.get("_bench_compiled")
            if fn is None:
                fn = opt.__dict__["_bench_compiled"] = torch.compile(opt.step)
            fn()

        impls.append(
            Impl(
                "torch.AdamW[compiled]",
                "torch",
                "adamw",
                lambda nm: o.AdamW(_plain(nm), lr=LR, weight_decay=0.01, foreach=True),
                _t(7),
                step=compiled_step,
                note="torch.compile(opt.step); compile time in the first step",
            )
        )
    return impls


def peer_impls() -> tuple[list[Impl], dict[str, str]]:
    impls: list[Impl] = []
    skipped: dict[str, str] = {}
    try:
        import timm.optim as tim

        impls += [
            Impl("timm.Lamb", "timm", "lamb", lambda nm: tim.Lamb(_plain(nm), lr=LR, weight_decay=0.01), _t(10)),
            Impl("timm.Lion", "timm", "lion", lambda nm: tim.Lion(_plain(nm), lr=LR, foreach=True), _t(5)),
            Impl("timm.Adafactor", "timm", "adafactor", lambda nm: tim.Adafactor(_plain(nm), lr=LR), adafactor_transfers),
            Impl("timm.NAdamW", "timm", "nadam", lambda nm: tim.NAdamW(_plain(nm), lr=LR), _t(7)),
            Impl("timm.RAdam", "timm", "radam", lambda nm: tim.RAdam(_plain(nm), lr=LR), _t(7)),
            Impl(
                "timm.Lookahead+AdamW",
                "timm",
                "lookahead+adamw",
                lambda nm: tim.Lookahead(torch.optim.AdamW(_plain(nm), lr=LR, fused=True)),
                _t(7 + 2 / 5),
            ),
        ]
    except Exception as exc:
        skipped["timm"] = f"{type(exc).__name__}: {exc}"
    try:
        import pytorch_optimizer as po

        impls += [
            Impl(
                "pytorch-optimizer.Lamb",
                "pytorch-optimizer",
                "lamb",
                lambda nm: po.Lamb(_plain(nm), lr=LR, weight_decay=0.01, foreach=True),
                _t(10),
            ),
            Impl(
                "pytorch-optimizer.Lion", "pytorch-optimizer", "lion", lambda nm: po.Lion(_plain(nm), lr=LR, foreach=True), _t(5)
            ),
            Impl(
                "pytorch-optimizer.AdaFactor",
                "pytorch-optimizer",
                "adafactor",
                lambda nm: po.AdaFactor(_plain(nm), lr=LR, relative_step=False, betas=(None, 0.999), foreach=True),
                adafactor_transfers,
            ),
            Impl(
                "pytorch-optimizer.Ranger",
                "pytorch-optimizer",
                "ranger",
                lambda nm: po.Ranger(_plain(nm), lr=LR, foreach=True, use_gc=False),
                _t(7 + 2 / 6),
            ),
            Impl(
                "pytorch-optimizer.RAdam",
                "pytorch-optimizer",
                "radam",
                lambda nm: po.RAdam(_plain(nm), lr=LR, foreach=True),
                _t(7),
            ),
            Impl(
                "pytorch-optimizer.NAdam",
                "pytorch-optimizer",
                "nadam",
                lambda nm: po.NAdam(_plain(nm), lr=LR, foreach=True),
                _t(7),
            ),
        ]
    except Exception as exc:
        skipped["pytorch-optimizer"] = f"{type(exc).__name__}: {exc}"
    try:
        from transformers.optimization import Adafactor as HFAdafactor

        impls.append(
            Impl(
                "transformers.Adafactor",
                "transformers",
                "adafactor",
                lambda nm: HFAdafactor(_plain(nm), lr=LR, relative_step=False, scale_parameter=True, warmup_init=False),
                adafactor_transfers,
            )
        )
    except Exception as exc:
        skipped["transformers"] = f"{type(exc).__name__}: {exc}"
    try:
        import heavyball

        for cls_name, algorithm in (("AdamW", "adamw"), ("NAdam", "nadam")):
            cls = getattr(heavyball, cls_name, None)
            if cls is not None:
                impls.append(Impl(f"heavyball.{cls_name}", "heavyball", algorithm, lambda nm, c=cls: c(_plain(nm), lr=LR), _t(7)))  # type: ignore[misc]
    except Exception as exc:
        skipped["heavyball"] = f"{type(exc).__name__}: {exc}"
    return impls, skipped


# ---------------------------------------------------------------------------------------- measurement


@dataclass
class Result:
    name: str
    family: str
    algorithm: str
    median_s: float | None = None
    times_s: list[float] = field(default_factory=list)
    ratio: float | None = None
    ratio_of_medians: float | None = None
    transfers: float | None = None
    bytes_per_param: float | None = None
    achieved_gbs: float | None = None
    efficiency: float | None = None
    state_bytes_per_param: float | None = None
    first_step_s: float | None = None
    peak_extra_bytes: int | None = None
    peak_extra_tensors: float | None = None
    batch: int = 0
    reference_s: float | None = None
    bandwidth_gbs: float | None = None
    calls: int = 1
    note: str = ""
    error: str | None = None
    paired_with: str | None = None  # PAIRED's implementation of the same algorithm
    paired_ratios: list[float] = field(default_factory=list)  # per round: step time / its step time


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total, seen = 0, set()
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, Tensor) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    for group in opt.param_groups:  # peers that keep state elsewhere (lookahead wrappers) are not counted
        del group
    return total


def _do_step(impl: Impl, opt: torch.optim.Optimizer) -> None:
    for _ in range(impl.calls):
        if impl.step is not None:
            impl.step(opt)
        else:
            opt.step()


def _probes(params: list[Tensor], grads: list[Tensor]) -> dict[str, tuple[Callable[[], None], float]]:
    """In-place streams over the parameter set: (function, transfers per parameter)."""

    def rmw2() -> None:
        with torch.no_grad():
            torch._foreach_mul_(params, 1.0)  # read p, write p

    def rmw3() -> None:
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=0.0)  # read p, g, write p

    probes = {"probe.rmw2": (rmw2, 2.0), "probe.rmw3": (rmw3, 3.0)}
    from danlu import _native

    lib = _native.load()
    if lib is not None and all(p.dtype is torch.float32 and p.is_contiguous() for p in params):
        import ctypes

        # two more arrays per tensor, allocated once: Adam's pattern, 4 streams read and 3 written
        extra = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        n = len(params)
        numel = (ctypes.c_int64 * n)(*[p.numel() for p in params])
        ptrs = (ctypes.c_void_p * (4 * n))(
            *[x for p, g, (c, d) in zip(params, grads, extra) for x in (p.data_ptr(), g.data_ptr(), c.data_ptr(), d.data_ptr())]
        )

        def stream7() -> None:
            lib.danlu_probe(n, numel, ptrs, 0.0)
            stream7.keep = extra  # type: ignore[attr-defined]

        probes["probe.stream7"] = (stream7, 7.0)
    return probes


def _batches(impls: list[Impl], state_estimate: dict[str, float], budget_bytes: float) -> list[list[Impl]]:
    batches: list[list[Impl]] = []
    current: list[Impl] = []
    used = 0.0
    for impl in impls:
        need = state_estimate.get(impl.name, 3.0)
        if current and used + need > budget_bytes:
            batches.append(current)
            current, used = [], 0.0
        current.append(impl)
        used += need
    if current:
        batches.append(current)
    return batches


def run(
    set_name: str,
    impls: list[Impl],
    *,
    scale: float = 1.0,
    rounds: int = 7,
    warmup: int = 2,
    budget_gb: float = 3.0,
    memory: bool = True,
    log: Callable[[str], None] = lambda s: print(s, flush=True),
) -> dict[str, Any]:
    """Measure ``impls`` on one parameter set; return a JSON-ready dict."""
    named = parameter_set(set_name, scale)
    params: list[Tensor] = [p for _, p in named]
    grads: list[Tensor] = [p.grad for p in params if p.grad is not None]
    assert len(grads) == len(params), "every benchmark parameter carries a gradient"
    shapes = [tuple(p.shape) for p in params]
    n = sum(p.numel() for p in params)
    elem = params[0].element_size()
    largest = max(p.numel() for p in params) * elem
    grad_backup = [g.clone() for g in grads]
    torch_ref = next(i for i in torch_impls(False) if i.name == REFERENCE)
    others = [i for i in impls if i.name != REFERENCE]
    estimate = {i.name: 3.0 * n * elem for i in others}
    batches = _batches(others, estimate, budget_gb * 1e9)
    results: dict[str, Result] = {}
    bandwidths: list[float] = []
    memory_probes: dict[str, tuple[Callable[[], None], float]] = {}
    probe_rows: dict[str, list[float]] = {}
    log(
        f"[{set_name}] {len(params)} tensors, {n / 1e6:.1f} M parameters, {len(others)} implementations in {len(batches)} batches"
    )
    for b_index, batch in enumerate(batches):
        members = [torch_ref, *batch]
        opts: dict[str, torch.optim.Optimizer] = {}
        for impl in members:
            result = results.setdefault(
                impl.name, Result(impl.name, impl.family, impl.algorithm, calls=impl.calls, note=impl.note)
            )
            try:
                for p, g in zip(params, grads):
                    p.grad = g
                opt = impl.make(named)
                t0 = time.perf_counter()
                _do_step(impl, opt)
                first = time.perf_counter() - t0
                for _ in range(warmup - 1):
                    for p, g in zip(params, grads):
                        p.grad = g
                    _do_step(impl, opt)
                opts[impl.name] = opt
                if result.first_step_s is None:
                    result.first_step_s = first
                    result.state_bytes_per_param = _state_bytes(opt) / n
            except Exception as exc:
                result.error = f"{type(exc).__name__}: {str(exc)[:300]}"
                log(f"  {impl.name}: skipped ({result.error})")
        probes = _probes(params, grads) if b_index == 0 or not memory_probes else memory_probes
        memory_probes = probes
        timings: dict[str, list[float]] = {name: [] for name in [*opts, *probes]}
        by_name = {i.name: i for i in members}
        order = list(timings)
        for r in range(rounds):
            rotated = order[r % len(order) :] + order[: r % len(order)]
            for name in rotated:
                for p, g in zip(params, grads):  # some peers drop p.grad after their step
                    if p.grad is not g:
                        p.grad = g
                if name in probes:
                    fn = probes[name][0]
                    t0 = time.perf_counter()
                    fn()
                else:
                    impl, opt = by_name[name], opts[name]
                    t0 = time.perf_counter()
                    _do_step(impl, opt)
                timings[name].append(time.perf_counter() - t0)
            for g, saved in zip(grads, grad_backup):  # accumulation writes the mean into p.grad
                g.copy_(saved)
        medians = {name: statistics.median(ts) for name, ts in timings.items()}
        bandwidth = max(probes[name][1] * n * elem / medians[name] for name in probes)
        round_bandwidth = [max(probes[name][1] * n * elem / timings[name][r] for name in probes) for r in range(rounds)]
        bandwidths.append(bandwidth)
        for name in probes:
            probe_rows.setdefault(name, []).append(probes[name][1] * n * elem / medians[name] / 1e9)
        ref = medians.get(REFERENCE)
        for name in opts:
            result = results[name]
            if name == REFERENCE and result.median_s is not None and b_index > 0:
                result.times_s += timings[name]
                continue
            impl = by_name[name]
            result.median_s = medians[name]
            result.times_s = timings[name]
            result.batch = b_index
            result.reference_s = ref
            result.bandwidth_gbs = bandwidth / 1e9
            # paired per round (the machine's load drifts between rounds): the medians of the ratios
            # to the reference and of the efficiencies against the bandwidth of the same round
            result.ratio = statistics.median(t / r for t, r in zip(timings[name], timings[REFERENCE])) if ref else None
            result.ratio_of_medians = medians[name] / ref if ref else None
            peer = PAIRED.get(impl.algorithm)
            if peer is not None and peer != name and peer in opts:
                result.paired_with = peer
                result.paired_ratios = [t / r for t, r in zip(timings[name], timings[peer])]
            result.transfers = impl.transfers(shapes)
            result.bytes_per_param = result.transfers * elem
            result.achieved_gbs = result.bytes_per_param * n / medians[name] / 1e9
            result.efficiency = statistics.median(
                result.bytes_per_param * n / t / bw for t, bw in zip(timings[name], round_bandwidth)
            )
        if memory:
            for name, opt in opts.items():
                result = results[name]
                if result.peak_extra_bytes is not None:
                    continue
                for p, g in zip(params, grads):
                    p.grad = g
                try:
                    with PeakMemory() as peak:
                        _do_step(by_name[name], opt)
                    result.peak_extra_bytes = peak.peak
                    result.peak_extra_tensors = peak.peak / largest
                except Exception as exc:
                    log(f"  {name}: peak memory not measured ({type(exc).__name__}: {str(exc)[:120]})")
        log(f"  batch {b_index}: fused AdamW {ref * 1e3 if ref else 0:.2f} ms, bandwidth {bandwidth / 1e9:.1f} GB/s")
        for name in opts:
            if name == REFERENCE:
                continue
            r_ = results[name]
            log(f"  {name:32s} {(r_.median_s or 0.0) * 1e3:9.2f} ms  x{(r_.ratio or 0):5.2f}  eff {(r_.efficiency or 0):4.2f}")
        del opts
        gc.collect()
        for g, saved in zip(grads, grad_backup):
            g.copy_(saved)
    return {
        "set": set_name,
        "scale": scale,
        "tensors": len(params),
        "parameters": n,
        "dtype": str(params[0].dtype),
        "largest_tensor_bytes": largest,
        "bandwidth_gbs_per_batch": [b / 1e9 for b in bandwidths],
        "probes_gbs": probe_rows,
        "results": [vars(r) for r in results.values()],
    }


# ---------------------------------------------------------------------------------------- report


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# danlu bench ({report['machine']['summary']})", ""]
    lines.append(
        "Median step time over rounds, implementations interleaved round-robin in batches; ratio = median over "
        "rounds of (step time / torch's fused AdamW step time in the same round); bytes/param from the traffic "
        "model; GB/s = bytes moved / median time; efficiency = median over rounds of achieved / measured "
        "bandwidth, the bandwidth being the fastest in-place probe of the same round; peak = extra memory "
        "allocated during one step, in units of the largest parameter tensor; first step = state creation plus "
        "kernel build/load or compilation."
    )
    for entry in report["sets"]:
        lines += [
            "",
            f"## {entry['set']}: {entry['tensors']} tensors, {entry['parameters'] / 1e6:.1f} M parameters ({entry['dtype']}, scale {entry['scale']})",
            "",
        ]
        bw = entry["bandwidth_gbs_per_batch"]
        lines.append(f"Measured bandwidth per batch (GB/s): {', '.join(f'{b:.1f}' for b in bw)}")
        lines.append("")
        lines.append(
            "| implementation | algorithm | ms/step | x fused AdamW | bytes/param | GB/s | efficiency | state B/param | peak extra (tensors) | first step s |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        rows = sorted(entry["results"], key=lambda r: (r["algorithm"], r["median_s"] or 1e9))
        for r in rows:
            if r["error"]:
                lines.append(f"| {r['name']} | {r['algorithm']} | skipped: {r['error'][:80]} |||||||| |")
                continue
            lines.append(
                f"| {r['name']} | {r['algorithm']} | {_fmt(r['median_s'] and r['median_s'] * 1e3, '.1f')} | {_fmt(r['ratio'], '.2f')} | "
                f"{_fmt(r['bytes_per_param'], '.1f')} | {_fmt(r['achieved_gbs'], '.1f')} | {_fmt(r['efficiency'], '.2f')} | "
                f"{_fmt(r['state_bytes_per_param'], '.2f')} | {_fmt(r['peak_extra_tensors'], '.2f')} | {_fmt(r['first_step_s'], '.2f')} |"
            )
        lines += _paired_lines(entry["results"])
    if report.get("skipped"):
        lines += ["", "Peers not measured: " + "; ".join(f"{k} ({v})" for k, v in report["skipped"].items())]
    return "\n".join(lines) + "\n"


def _paired_lines(results: list[dict[str, Any]]) -> list[str]:
    """The rows paired per round with torch's implementation of their algorithm (see :data:`PAIRED`)."""
    lines = []
    for r in results:
        ratios = r.get("paired_ratios")
        if ratios:
            lines.append(
                f"- {r['name']} / {r['paired_with']}, paired per round: median {statistics.median(ratios):.2f} "
                f"({min(ratios):.2f} to {max(ratios):.2f} over {len(ratios)} rounds)"
            )
    return ["", *lines] if lines else []


def _machine() -> dict[str, Any]:
    from danlu import _native

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "native": _native.status(),
        "summary": f"{cpu}, {torch.get_num_threads()} thread(s), torch {torch.__version__}",
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``danlu bench`` (shared by the CLI and ``benchmarks/run.py``)."""
    parser.add_argument("--sets", default="bert,many-small,one-big", help="parameter sets: bert, many-small, one-big")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="shrink the first dimension of every tensor (0.1 for a quick run)"
    )
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per implementation (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (state creation, compilation)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (1: the machine is shared)")
    parser.add_argument("--only", default="", help="comma-separated substrings of implementation names or algorithms to keep")
    parser.add_argument("--exclude", default="", help="comma-separated substrings of implementation names to leave out")
    parser.add_argument("--no-peers", action="store_true", help="skip timm, pytorch-optimizer, transformers, heavyball")
    parser.add_argument("--no-torch", action="store_true", help="skip torch.optim (except the fused AdamW reference)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd torch.optim.AdamW")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    parser.add_argument("--budget-gb", type=float, default=3.0, help="optimizer state held at once (sets the batch size)")
    parser.add_argument("--out", default="benchmarks/results", help="directory for results.json and results.md")
    parser.add_argument("--tag", default="", help="suffix of the output file names")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``danlu bench``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="danlu bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_args(parser.parse_args(argv))


def run_args(args: argparse.Namespace) -> int:
    """Run the benchmark from options parsed with :func:`add_arguments` (for a CLI subcommand)."""
    torch.set_num_threads(args.threads)
    impls = danlu_impls()
    if not args.no_torch:
        impls += torch_impls(args.compile)
    skipped: dict[str, str] = {}
    if not args.no_peers:
        peers, skipped = peer_impls()
        impls += peers
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",") if k.strip()]
        impls = [i for i in impls if any(k in i.name.lower() or k == i.algorithm for k in keys)]
    if args.exclude:
        drop = [k.strip().lower() for k in args.exclude.split(",") if k.strip()]
        impls = [i for i in impls if not any(k in i.name.lower() for k in drop)]
    report: dict[str, Any] = {"machine": _machine(), "skipped": skipped, "args": vars(args), "sets": []}
    for set_name in [s.strip() for s in args.sets.split(",") if s.strip()]:
        if set_name not in PARAMETER_SETS:
            print(f"danlu bench: unknown parameter set {set_name!r} (choose from {', '.join(PARAMETER_SETS)})", file=sys.stderr)
            return 2
        report["sets"].append(
            run(
                set_name,
                impls,
                scale=args.scale,
                rounds=args.rounds,
                warmup=args.warmup,
                budget_gb=args.budget_gb,
                memory=not args.no_memory,
            )
        )
    report["machine"]["native"] = _machine()["native"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.tag}" if args.tag else ""
    (out / f"results{suffix}.json").write_text(json.dumps(report, indent=1))
    (out / f"results{suffix}.md").write_text(markdown(report))
    print(f"wrote {out / f'results{suffix}.json'} and {out / f'results{suffix}.md'}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
