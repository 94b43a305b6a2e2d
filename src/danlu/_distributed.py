"""Whole-tensor arithmetic for sharded parameters (FSDP2's DTensors) and plain tensors alike.

Under ``torch.distributed.fsdp.fully_shard`` every parameter, gradient and state tensor is a
``DTensor``: each process holds a shard (``Shard(0)``, uneven when the first dimension does not
divide). Elementwise arithmetic on DTensors is exact shard by shard, and DTensor's dispatch takes
most reductions over the whole tensor. A few things are not right out of the box, and every
reduction of danlu goes through this module for them:

* a reduction over a sharded dimension gives a ``Partial`` DTensor that is reduced only when it
  meets a non-linear op; a boolean ``any`` is ``Partial(sum)``, so casting it to a number before
  it is reduced gives 2 where two shards are non-zero (:func:`settle` reduces it first);
* ``torch._foreach_copy_`` has no sharding rule (:func:`foreach_copy_`);
* a state tensor of another shape than its parameter (Adafactor's row and column statistics) must
  be a DTensor with the placements of the reduced parameter, or ``torch.distributed.checkpoint``
  saves one process's shard as if it were the whole tensor (:func:`zeros_reduced`);
* a norm must be the norm of the whole tensor (:func:`whole_norms`), and a decision such as "the
  gradients are finite" must be the same on every process (:func:`all_finite`).

On plain tensors (one process, DDP) every helper is the ordinary single-tensor operation, with no
collective and no overhead beyond one ``isinstance`` check.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from typing_extensions import TypeIs

__all__ = [
    "DTensor",
    "is_dtensor",
    "any_dtensor",
    "settle",
    "placed_like",
    "foreach_copy_",
    "zeros_reduced",
    "whole_norms",
    "all_finite",
    "nonfinite_flag",
    "all_zero",
    "all_reduce_mean_",
    "sync_group",
    "GRAD_SYNC",
    "local",
]

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor, Replicate
else:
    try:  # torch >= 2.5 has the public module; 2.4 keeps it under _tensor
        from torch.distributed.tensor import DTensor, Replicate
    except Exception:  # pragma: no cover - builds without distributed support
        try:
            from torch.distributed._tensor import DTensor, Replicate
        except Exception:
            DTensor = None
            Replicate = None


def is_dtensor(t: Any) -> TypeIs[DTensor]:
    """Whether ``t`` is a DTensor (an ``nn.Parameter`` of FSDP2 is one)."""
    return DTensor is not None and isinstance(t, DTensor)


def any_dtensor(tensors: Sequence[Any]) -> bool:
    return DTensor is not None and any(isinstance(t, DTensor) for t in tensors)


def settle(t: Tensor) -> Tensor:
    """Reduce the pending (``Partial``) placements of a DTensor; plain tensors are returned as they are."""
    if not is_dtensor(t):
        return t
    placements = t.placements
    if not any(p.is_partial() for p in placements):
        return t
    return t.redistribute(t.device_mesh, [Replicate() if p.is_partial() else p for p in placements])


def placed_like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` (of ``ref``'s shape) with ``ref``'s placements (a local slice when ``t`` is replicated)."""
    if is_dtensor(t) and is_dtensor(ref) and tuple(t.placements) != tuple(ref.placements):
        return t.redistribute(ref.device_mesh, ref.placements)
    return t


def foreach_copy_(dst: Sequence[Tensor], src: Sequence[Tensor]) -> None:
    """``torch._foreach_copy_``, which DTensor has no rule for (a loop of ``copy_`` on DTensors)."""
    if not dst:
        return
    if any_dtensor(dst) or any_dtensor(src):
        for d, s in zip(dst, src):
            d.copy_(s)
        return
    torch._foreach_copy_(list(dst), list(src))


def zeros_reduced(p: Tensor, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
    """Zeros of ``shape`` (``p``'s shape with some dimensions reduced to 1), placed like ``p``.

    For a DTensor ``p``, a dimension that keeps its size keeps its shard; a reduced dimension (size
    1) and everything else is replicated. The result is what a reduction of ``p`` over those
    dimensions gives, so that ``state.add_(p.mean(dim, keepdim=True))`` needs no redistribution
    of the state, and a distributed checkpoint saves the whole statistics.
    """
    shape = list(shape)
    if not is_dtensor(p):
        return torch.zeros(shape, dtype=dtype, device=p.device)
    from torch.distributed.tensor import zeros as dzeros

    placements = []
    for placement in p.placements:
        dim = getattr(placement, "dim", None)
        if placement.is_shard() and dim is not None and shape[dim] == p.shape[dim] and shape[dim] > 1:
            placements.append(placement)
        else:
            placements.append(Replicate())
    return dzeros(shape, dtype=dtype, device_mesh=p.device_mesh, placements=placements)


def whole_norms(tensors: Sequence[Tensor], dtype: torch.dtype | None = None) -> list[Tensor]:
    """The 2-norm of each whole tensor, as 0-dim tensors (plain tensors, the same on every process).

    Plain tensors take one ``torch._foreach_norm``; DTensors take their shards' norms and one
    reduction each (``full_tensor``), so the norm of a sharded tensor is never a shard's norm.
    """
    if not tensors:
        return []
    if not any_dtensor(tensors):
        norms = torch._foreach_norm(list(tensors))
        return [n if dtype is None else n.to(dtype) for n in norms]
    out = []
    for t in tensors:
        n = torch.linalg.vector_norm(t)
        n = n.full_tensor() if is_dtensor(n) else n
        out.append(n if dtype is None else n.to(dtype))
    return out


def local(t: Tensor) -> Tensor:
    """This process's shard of a DTensor (a view: writing it writes the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


GRAD_SYNC = "_danlu_grad_sync"
"""Optimizer attribute: the process group whose gradients are left unsynchronized for the
optimizer to average (set by :func:`danlu.distributed.sync_on_apply`)."""


def sync_group(opt: Any) -> Any:
    """The process group over which ``opt`` averages unsynchronized gradients, or None."""
    return opt.__dict__.get(GRAD_SYNC)


def all_reduce_mean_(tensors: Sequence[Tensor], group: Any) -> None:
    """Average plain tensors over ``group`` in place, with one all-reduce per (device, dtype)."""
    import torch.distributed as dist

    world = dist.get_world_size(group)
    buckets: dict[tuple[Any, ...], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def all_zero(tensors: Sequence[Tensor]) -> bool:
    """True if every element of every tensor is 0, decided identically on every process (FSDP2)."""
    nonzero = torch.zeros((), dtype=torch.float32)
    meshes: dict[int, Any] = {}
    sharded = any_dtensor(tensors)
    for t in tensors:
        if is_dtensor(t):
            meshes.setdefault(id(t.device_mesh), t.device_mesh)
            t = t.to_local()
        if t.is_sparse:
            t = t.coalesce().values()
        if t.numel() and bool(t.ne(0).any()):
            nonzero = torch.ones((), dtype=torch.float32)
            if not sharded:
                break
    if meshes:
        import torch.distributed as dist

        for mesh in meshes.values():
            flag = nonzero.to(mesh.device_type)
            for dim in range(mesh.ndim):
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
            nonzero = flag.cpu()
    return bool(nonzero.item() == 0)


def all_finite(tensors: Sequence[Tensor], group: Any = None) -> bool:
    """True if every element of every tensor is finite, decided identically on every process.

    Checks each tensor's local values (a sparse tensor's values) with one pass per tensor, its
    minimum and maximum on the CPU and one fused infinity norm per (device, dtype) elsewhere
    (``inf`` and ``nan`` propagate; finite 16-bit values never overflow an infinity norm), and
    for DTensors combines the verdicts of all shards with one all-reduce per device mesh (and over
    ``group`` too, when the gradients of plain tensors are not synchronized).
    """
    return bool(nonfinite_flag(tensors, group).item() == 0)


def nonfinite_flag(tensors: Sequence[Tensor], group: Any = None) -> Tensor:
    """:func:`all_finite` as a 0-dim float32 CPU tensor, without a host read: 0 if every element is finite, else 1."""
    locals_: list[Tensor] = []
    meshes: dict[int, Any] = {}
    for t in tensors:
        if is_dtensor(t):
            meshes.setdefault(id(t.device_mesh), t.device_mesh)
            t = t.to_local()
        if t.is_sparse:
            t = t.coalesce().values()
        if t.numel():
            locals_.append(t)
    bad = torch.zeros((), dtype=torch.float32)
    if locals_:
        buckets: dict[tuple[Any, ...], list[Tensor]] = {}
        for t in locals_:
            buckets.setdefault((t.device, t.dtype), []).append(t)
        flags = []
        for bucket in buckets.values():
            bucket = [torch.view_as_real(t) if t.is_complex() else t for t in bucket]  # |z| of finite parts may overflow
            if bucket[0].device.type == "cpu":  # its min and max: an infinity norm on the CPU is ~15x slower
                ends = [end for t in bucket for end in torch.aminmax(t)]
                flags.append((~torch.stack(ends).isfinite()).any().float())
                continue
            norms = torch._foreach_norm(bucket, float("inf"))
            flags.append((~torch.stack(norms).isfinite()).any().float().cpu())
        bad = torch.stack(flags).amax()
    if meshes:
        import torch.distributed as dist

        for mesh in meshes.values():
            device = mesh.device_type
            flag = bad.to(device)
            for dim in range(mesh.ndim):
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
            bad = flag.cpu()
    if group is not None:
        import torch.distributed as dist

        device = next((t.device for t in locals_ if t.device.type != "cpu"), torch.device("cpu"))
        flag = bad.to(device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        bad = flag.cpu()
    return bad
