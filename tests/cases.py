"""One table of optimizer cases and one of derivation cases, shared by the cross-cutting tests."""

from __future__ import annotations

from typing import Any

import torch

import danlu

OPTIMIZER_CASES: list[tuple[str, type, dict[str, Any]]] = [
    ("sgd", danlu.SGD, dict(lr=0.1)),
    ("sgd_momentum", danlu.SGD, dict(lr=0.05, momentum=0.9)),
    ("sgd_dampening", danlu.SGD, dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("sgd_nesterov", danlu.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("adagrad", danlu.Adagrad, dict(lr=0.1, initial_accumulator_value=0.1)),
    ("adadelta", danlu.Adadelta, dict(lr=1.0, rho=0.9)),
    ("rmsprop", danlu.RMSprop, dict(lr=0.01)),
    ("rmsprop_centered_momentum", danlu.RMSprop, dict(lr=0.01, momentum=0.8, centered=True)),
    ("adam", danlu.Adam, dict(lr=0.01)),
    ("adam_nobc", danlu.Adam, dict(lr=0.01, bias_correction=False, eps=1e-4)),
    ("nadam", danlu.NAdam, dict(lr=0.01)),
    ("radam", danlu.RAdam, dict(lr=0.01)),
    ("adafactor", danlu.Adafactor, dict(lr=0.01, min_dim_size_to_factor=4)),
    ("adafactor_relstep_b1", danlu.Adafactor, dict(lr=None, beta1=0.9, beta2=0.99, min_dim_size_to_factor=4)),
    ("lion", danlu.Lion, dict(lr=0.01)),
    ("lazyadam", danlu.LazyAdam, dict(lr=0.01)),
    ("muon", danlu.Muon, dict(lr=0.02, ns_dtype=torch.float64)),
]

SHAPES: dict[str, tuple[int, ...]] = {
    "embeddings": (9, 5),
    "dense.kernel": (6, 7),
    "dense.bias": (7,),
    "LayerNorm.gamma": (7,),
    "attn.kernel": (3, 6, 5),
    "scalar": (),
}


def named_params(dtype: torch.dtype = torch.float64, seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (name, torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)))
        for name, shape in SHAPES.items()
    ]


def gradients(params: list[tuple[str, torch.Tensor]], steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    """Gradient sequences; the embedding has all-zero rows (so lazy updates show)."""
    generator = torch.Generator().manual_seed(seed)
    sequence = []
    for _ in range(steps):
        grads = []
        for name, p in params:
            g = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            if name == "embeddings":
                g[torch.randperm(p.shape[0], generator=generator)[:4]] = 0
            grads.append(g.to(p.dtype))
        sequence.append(grads)
    return sequence


def run(opt: torch.optim.Optimizer, params: list[tuple[str, torch.Tensor]], grads: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    for step_grads in grads:
        for (_, p), g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach().clone() for _, p in params]
