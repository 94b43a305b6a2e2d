"""Stop at any call, save model and optimizer, load both into fresh objects, continue: bit-identical."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

import danlu
from cases import DERIVATION_CASES, OPTIMIZERS, derive

STOPS = (1, 2, 4, 5, 7)  # mid accumulation cycle, between Lookahead syncs, right after one
CALLS = 9
MATRIX = [[case.id] for case in DERIVATION_CASES] + [
    ["gradient_accumulation", "piecewise_linear_lr", "weight_decay", "layer_adaptation", "lookahead", "ema"],
    ["gradient_accumulation", "clip", "lookahead"],
    ["schedule_free", "gradient_accumulation", "ema"],
]
BASES = {
    name: (OPTIMIZERS[name].cls, dict(OPTIMIZERS[name].kwargs))
    for name in ("adam", "adafactor_relative_step_momentum", "torch.AdamW", "muon")
}
BASES["torch.AdamW"][1]["weight_decay"] = 0.0  # the matrix's weight_decay derivation decays instead


def model_and_batches(seed: int = 0) -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict(
        {"embeddings": torch.nn.Embedding(12, 6), "dense": torch.nn.Linear(6, 5), "LayerNorm": torch.nn.LayerNorm(5)}
    ).double()
    batches = [(torch.randint(0, 12, (4,)), torch.randn(4, 5, dtype=torch.float64)) for _ in range(CALLS)]
    return model, batches


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list[Any]) -> None:
    for ids, target in batches:
        opt.zero_grad()
        out = model["LayerNorm"](model["dense"](model["embeddings"](ids)))
        torch.nn.functional.mse_loss(out, target).backward()
        opt.step()


def build(cls: type, kwargs: dict[str, Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    return cls(model.named_parameters(), **kwargs)


@pytest.mark.filterwarnings("ignore:.*matches no parameter name")
@pytest.mark.parametrize("base_name", list(BASES))
@pytest.mark.parametrize("names", MATRIX, ids=["+".join(m) for m in MATRIX])
def test_resume_at_every_call_is_bit_identical(base_name: str, names: list[str]) -> None:
    base, base_kwargs = BASES[base_name]
    cls, derivation_kwargs = derive(base, names)
    kwargs = {**base_kwargs, **derivation_kwargs}
    model, batches = model_and_batches()
    opt = build(cls, kwargs, model)
    train(model, opt, batches)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    if "ema" in names:
        with opt.ema_weights():
            expected_ema = [p.detach().clone() for p in model.parameters()]
    for stop in STOPS:
        model, batches = model_and_batches()
        opt = build(cls, kwargs, model)
        train(model, opt, batches[:stop])
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
        del model, opt
        buffer.seek(0)
        checkpoint = torch.load(buffer)
        fresh, _ = model_and_batches(seed=1)
        fresh.load_state_dict(checkpoint["model"])
        resumed = build(cls, kwargs, fresh)
        resumed.load_state_dict(checkpoint["optimizer"])
        train(fresh, resumed, batches[stop:])
        for key, value in fresh.state_dict().items():
            assert torch.equal(value, expected[key]), f"stopped after call {stop}: {key} differs"
        if "ema" in names:
            with resumed.ema_weights():
                assert all(torch.equal(a, b) for a, b in zip(expected_ema, fresh.parameters()))
