"""Precision options of danlu's optimizers: the state dtype and stochastic rounding of bf16 writes.

``state_dtype`` (constructor keyword of every danlu optimizer, also a param-group option):

* ``None`` (default): the state and the arithmetic of the update are float32 for bfloat16 and
  float16 parameters (16-bit moments underflow: Adam's ``(1 - beta2) * g**2`` and an ``eps`` of
  1e-8 are zero in float16) and the parameter's own dtype otherwise;
* a floating dtype: the state and the arithmetic are in that dtype for every floating parameter
  (``torch.float32`` spelled out; ``torch.float64`` for more; ``torch.bfloat16`` to halve the
  state of float32 parameters, at the precision cost that implies).

The update is computed in that dtype and added to the parameter with one rounding (in-place
addition with type promotion), never rounded to the parameter's dtype first. The derivations'
parameter-shaped state (accumulated gradients, Lookahead's slow weights, the EMA weights) uses
the same dtype.

``stochastic_rounding=True`` rounds every write of a bfloat16 parameter (the update, Lookahead's
synchronization) stochastically: up or down to the two nearest bfloat16 values with the
probabilities that make the result unbiased, so that updates smaller than half a bfloat16 ulp
are not all lost. The random bits are a hash of the element's index, the parameter's step
count and its position in the optimizer, so a run resumed from a checkpoint rounds exactly as
one that never stopped (no generator state to save). Other dtypes round to nearest as usual.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from danlu._distributed import is_dtensor

__all__ = [
    "FLOATING",
    "check_state_dtype",
    "compute_dtype",
    "stochastic_round_bf16",
    "add_rounded_",
    "copy_rounded_",
]

FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF = (torch.float16, torch.bfloat16)


def check_state_dtype(value: Any) -> torch.dtype | None:
    """``None`` or a floating torch dtype (``TypeError`` / ``ValueError`` naming ``state_dtype``)."""
    if value is None:
        return None
    if not isinstance(value, torch.dtype):
        raise TypeError(f"Invalid state_dtype: expected None or a torch floating dtype, got {type(value).__name__} {value!r}")
    if value not in FLOATING:
        raise ValueError(f"Invalid state_dtype: {value!r} (expected one of {', '.join(map(str, FLOATING))})")
    return value


def compute_dtype(p: Tensor, state_dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype of the state and the arithmetic for ``p`` (see the module docstring)."""
    if not p.is_floating_point():
        return p.dtype
    if state_dtype is not None:
        return state_dtype
    return torch.float32 if p.dtype in _HALF else p.dtype


_MASK = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK
    return x ^ (x >> 16)


def stochastic_round_bf16(x: Tensor, seed: int) -> Tensor:
    """Round float32 ``x`` to bfloat16 stochastically: unbiased, deterministic given ``seed``.

    Adds 16 pseudo-random low bits to the float32 bit pattern and truncates them: the result is the
    bfloat16 above with probability equal to the distance from the one below, in bfloat16 ulps.
    Non-finite values round to nearest.
    """
    local = x.to_local() if is_dtensor(x) else x
    local = local.float().contiguous()
    index = torch.arange(local.numel(), device=local.device, dtype=torch.int64)
    bits = _hash32(_hash32(index) ^ (seed & _MASK)) & 0xFFFF
    raw = local.view(torch.int32).reshape(-1).to(torch.int64)
    rounded = ((raw + bits) & ~0xFFFF).to(torch.int32)  # may carry into the exponent: that is rounding up
    out = rounded.view(torch.float32).to(torch.bfloat16).view(local.shape)
    out = torch.where(local.isfinite(), out, local.to(torch.bfloat16))
    if is_dtensor(x):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(out, x.device_mesh, x.placements, shape=x.shape, stride=x.stride())
    return out


def _seed(salt: int, step: float) -> int:
    return int(_hash32(torch.tensor([(salt * 0x9E3779B1 + int(step)) & _MASK], dtype=torch.int64)).item())


def add_rounded_(params: Sequence[Tensor], updates: Sequence[Tensor], salts: Sequence[int], steps: Sequence[float]) -> None:
    """``p += u`` with stochastic rounding for bfloat16 parameters (round to nearest for the others)."""
    for p, u, salt, step in zip(params, updates, salts, steps):
        if p.dtype is torch.bfloat16:
            p.copy_(stochastic_round_bf16(p.float().add_(u), _seed(salt, step)))
        else:
            p.add_(u)


def copy_rounded_(params: Sequence[Tensor], sources: Sequence[Tensor], salts: Sequence[int], step: int) -> None:
    """``p.copy_(source)`` with stochastic rounding for bfloat16 parameters."""
    for p, source, salt in zip(params, sources, salts):
        if p.dtype is torch.bfloat16 and source.dtype is not torch.bfloat16:
            p.copy_(stochastic_round_bf16(source, _seed(salt ^ 0x5BD1E995, step)))
        else:
            p.copy_(source)
