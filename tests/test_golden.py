"""The reference trajectories of ../shared/golden, restated in the suite.

Every compared case (bert4keras under TensorFlow, torch.optim, optax, tensorflow-addons,
transformers) is replayed through danlu's public API in float64 and compared after every call, also
with a checkpoint and restore into a fresh optimizer halfway (contract section 4).
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import danlu
from conftest import golden_cases

CASES = [c for c in golden_cases() if c.get("compared", True)]
QUIRKS = [c for c in golden_cases() if not c.get("compared", True)]


def build(spec: dict[str, Any], named_params: list[tuple[str, torch.nn.Parameter]]) -> torch.optim.Optimizer:
    base = spec["base"]
    cls = getattr(torch.optim, base[len("torch.optim.") :]) if base.startswith("torch.optim.") else getattr(danlu, base)
    kwargs = dict(spec.get("hparams", {}))
    for derivation in spec.get("derivations", []):
        cls = getattr(danlu, derivation["fn"])(cls)
        kwargs.update(derivation.get("kwargs", {}))
    if isinstance(kwargs.get("betas"), list):
        kwargs["betas"] = tuple(kwargs["betas"])
    if isinstance(kwargs.get("lr_schedule"), dict):
        kwargs["lr_schedule"] = {int(k): v for k, v in kwargs["lr_schedule"].items()}
    return cls(named_params, **kwargs)


def feed(data: Any, params: list[tuple[str, torch.nn.Parameter]], t: int) -> None:
    for name, p in params:
        if "gidx/" + name in data.files:
            index = torch.tensor(data["gidx/" + name][t], dtype=torch.int64)
            values = torch.tensor(data["gval/" + name][t], dtype=torch.float64)
            p.grad = torch.sparse_coo_tensor(index[None, :], values, tuple(p.shape))
        else:
            p.grad = torch.tensor(data["grad/" + name][t], dtype=torch.float64)


def replay(case: dict[str, Any], directory: Path, resume_at: int | None = None) -> tuple[dict, dict]:
    data = np.load(directory / case["file"])
    names = [p["name"] for p in case["params"]]
    params = [(n, torch.nn.Parameter(torch.tensor(data["init/" + n], dtype=torch.float64))) for n in names]
    opt = build(case["danlu"], params)
    checks = {c["step"]: c["bias_correction"] for c in case.get("ema_checks", [])}
    trajectory: dict[str, list] = {n: [] for n in names}
    averaged: dict[str, list] = {n: [] for n in names}
    for t in range(case["steps"]):
        feed(data, params, t)
        opt.step()
        if resume_at is not None and t + 1 == resume_at:
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            params = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in params]
            opt = build(case["danlu"], params)
            buffer.seek(0)
            opt.load_state_dict(torch.load(buffer))
        for n, p in params:
            trajectory[n].append(p.detach().numpy().copy())
        if t + 1 in checks:
            before = [p.detach().clone() for _, p in params]
            with opt.ema_weights(bias_correction=checks[t + 1]):
                for n, p in params:
                    averaged[n].append(p.detach().numpy().copy())
            assert all(torch.equal(p.detach(), b) for (_, p), b in zip(params, before))
    return trajectory, averaged


def assert_matches(case: dict[str, Any], directory: Path, trajectory: dict, averaged: dict) -> None:
    data = np.load(directory / case["file"])
    rtol, atol = case["rtol"], case["atol"]
    for name in trajectory:
        np.testing.assert_allclose(np.stack(trajectory[name]), data["traj/" + name], rtol=rtol, atol=atol, err_msg=name)
        if case.get("ema_checks"):
            np.testing.assert_allclose(np.stack(averaged[name]), data["ema/" + name], rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.filterwarnings("ignore:paramwise_lr_schedule")
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_trajectory_matches_reference(case: dict[str, Any], golden: Path, float64: None) -> None:
    trajectory, averaged = replay(case, golden)
    assert_matches(case, golden, trajectory, averaged)


@pytest.mark.filterwarnings("ignore:paramwise_lr_schedule")
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_trajectory_matches_reference_across_a_checkpoint(case: dict[str, Any], golden: Path, float64: None) -> None:
    trajectory, averaged = replay(case, golden, resume_at=max(1, case["steps"] // 2 - 1))
    assert_matches(case, golden, trajectory, averaged)


@pytest.mark.parametrize("case", QUIRKS, ids=[c["name"] for c in QUIRKS])
def test_documented_bert4keras_quirks_differ(case: dict[str, Any], golden: Path, float64: None) -> None:
    """bert4keras' Lookahead and accumulation timing deliberately differ (docs/migration.md)."""
    trajectory, averaged = replay(case, golden)
    with pytest.raises(AssertionError):
        assert_matches(case, golden, trajectory, averaged)


def test_factored_state_is_rows_plus_columns(golden: Path, float64: None) -> None:
    case = next(c for c in CASES if c.get("max_state_numel"))
    data = np.load(golden / case["file"])
    params = [
        (p["name"], torch.nn.Parameter(torch.tensor(data["init/" + p["name"]], dtype=torch.float64))) for p in case["params"]
    ]
    opt = build(case["danlu"], params)
    feed(data, params, 0)
    opt.step()
    for name, limit in case["max_state_numel"].items():
        p = dict(params)[name]
        rows, cols = p.shape
        numel = sum(v.numel() for v in opt.state[p].values() if v.dim() > 0)
        assert numel == rows + cols <= limit


def test_adafactor_state_is_factored_for_large_matrices() -> None:
    w = torch.nn.Parameter(torch.randn(512, 384))
    opt = danlu.Adafactor([w], lr=1e-3)
    w.grad = torch.randn(512, 384)
    opt.step()
    shapes = {k: tuple(v.shape) for k, v in opt.state[w].items()}
    assert shapes == {"step": (), "exp_avg_sq_row": (1, 384), "exp_avg_sq_col": (512, 1)}
