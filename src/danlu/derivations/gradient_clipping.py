"""Gradient clipping (``extend_with_gradient_clipping``): Keras' ``global_clipnorm``, ``clipnorm`` and ``clipvalue``."""

from __future__ import annotations

import operator
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from danlu import _native
from danlu._distributed import any_dtensor, whole_norms
from danlu._native_spec import NoTensorWork
from danlu._validate import check_number
from danlu.derivations._base import Derivation

if TYPE_CHECKING:
    from danlu._context import StepContext
    from danlu._host import DerivationHost

__all__ = ["GradientClipping", "MODES"]

MODES = ("global_clipnorm", "clipnorm", "clipvalue")
_DTYPE, _LAYOUT, _IS_CPU = operator.attrgetter("dtype"), operator.attrgetter("layout"), operator.attrgetter("is_cpu")
"""The three options, of which exactly one is set (Keras' optimizer arguments)."""


class GradientClipping(Derivation):
    r"""Clip the gradient that each applied step uses, with Keras' semantics.

    Exactly one of the options is set:

    * ``global_clipnorm=c``: every gradient is multiplied by :math:`c / \max(n, c)`, where
      :math:`n = \sqrt{\sum_i \lVert g_i \rVert^2}` is the L2 norm over all gradients of all groups
      (``tf.clip_by_global_norm``; BERT clipped at 1.0);
    * ``clipnorm=c``: each gradient is multiplied by :math:`c / \max(\lVert g_i \rVert, c)`;
    * ``clipvalue=c``: each element is clamped to :math:`[-c, c]`.

    It acts on the gradient the applied step uses: under gradient accumulation the mean of the
    buffered gradients, in either composition order (clipping each micro-batch instead is the
    classic accumulation bug). Norms are taken over whole tensors, also when they are FSDP2 shards;
    under DDP the gradients are already reduced. On CPU, danlu's native kernels sum the squares of
    every gradient in one pass, in double (the same bits for any thread count and instruction set),
    and round each tensor's norm to its dtype; elsewhere ``torch._foreach_norm`` takes them. The caller's ``p.grad`` is never modified: the factor
    is handed to the base step, and danlu's native kernels fold it into their gradient coefficient.

    ``opt.grad_norm`` is the global norm before clipping of the last applied step (a 0-d tensor, as
    ``torch.nn.utils.clip_grad_norm_`` returns it; ``None`` before the first), in every mode. A
    non-finite norm (finite gradients whose squares overflow) never reaches the parameters: the step
    is not applied, and counted by ``extend_with_skip_nonfinite`` when that is in the stack (which
    also limits consecutive skips), else announced with a ``RuntimeWarning``. The call still counts
    in ``calls``, so under accumulation that cycle's gradients are dropped and a new cycle begins.

    Unlike ``torch.nn.utils.clip_grad_norm_(max_norm=c)``, whose factor is ``c / (n + 1e-6)`` (capped at
    1), the factor here is exactly Keras' ``c / max(n, c)``: a norm below ``c`` leaves the gradients as
    they are, to the bit.

    Keyword arguments: ``global_clipnorm=None``, ``clipnorm=None``, ``clipvalue=None`` (each finite
    and > 0; exactly one of them). ``global_clipnorm`` is the same in every parameter group.

    Example:
        >>> import torch, danlu
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = danlu.extend_with_gradient_clipping(danlu.SGD)([w], lr=1.0, global_clipnorm=1.0)
        >>> w.grad = torch.tensor([3.0, 4.0]); _ = opt.step()
        >>> w.detach(), opt.grad_norm
        (tensor([-0.6000, -0.8000]), tensor(5.))
    """

    name = "clip"
    title = "GradientClipping"
    defaults = {"global_clipnorm": None, "clipnorm": None, "clipvalue": None}
    has_gradient_hook = True
    native = NoTensorWork()
    """Its factors reach the kernels through the step context's gradient scales: nothing else per tensor."""

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        checked = {
            key: None if options[key] is None else check_number(key, options[key], low=0.0, low_open=True)
            for key in MODES
            if key in options
        }
        chosen = [key for key, value in checked.items() if value is not None]
        if len(chosen) > 1:
            raise ValueError(f"gradient clipping takes exactly one of {', '.join(MODES)}; got {', '.join(chosen)}")
        if len(checked) == len(MODES) and not chosen:
            raise ValueError(f"gradient clipping takes exactly one of {', '.join(MODES)}; none was set")
        return checked

    def check(self, host: DerivationHost) -> None:
        modes = {_mode(group) for group in host.param_groups}
        if len(modes) > 1:
            raise ValueError(f"gradient clipping: every parameter group must use the same option, got {sorted(modes)}")
        limits = {group["global_clipnorm"] for group in host.param_groups}
        if len(limits) > 1:
            raise ValueError(f"global_clipnorm must be the same in every parameter group, got {sorted(limits)}")

    def transform_gradients(self, host: DerivationHost, ctx: StepContext) -> bool | None:
        pairs = list(ctx.params_with_gradient())
        if not pairs:
            return None
        grads = [_scaled(ctx, p) for _, p in pairs]
        stacked = _native_norms(grads, host.param_groups)
        if stacked is None:
            stacked = torch.stack(whole_norms(grads, _norm_dtype(grads)))
        total = torch.linalg.vector_norm(stacked.sort().values)  # sorted: the same bits in any parameter order
        if not _is_compiling() and not bool(torch.isfinite(total)):
            return _nonfinite(host, total)
        _report_norm(host, total)
        mode = _mode(pairs[0][0])
        if mode == "global_clipnorm":
            limit = pairs[0][0]["global_clipnorm"]
            factor = limit / torch.clamp(total, min=limit)
            factor = _for_gradients(factor, grads)
            for _, p in pairs:
                ctx.scale(p, factor)
        elif mode == "clipnorm":
            for (group, p), grad, norm in zip(pairs, grads, stacked.unbind()):
                limit = group["clipnorm"]
                ctx.scale(p, _for_gradients(limit / torch.clamp(norm, min=limit), [grad]))
        else:
            for (group, p), grad in zip(pairs, grads):
                limit = group["clipvalue"]
                ctx.scales.pop(id(p), None)
                ctx.replace(p, _clamp(grad, limit))
        return None


def _clamp(grad: Tensor, limit: float) -> Tensor:
    """Each element clamped to [-limit, limit]; a complex one as its (real, imaginary) pair, as torch.optim treats it."""
    if grad.is_complex():
        return torch.view_as_complex(torch.view_as_real(grad).clamp(-limit, limit))
    return grad.clamp(-limit, limit)


def _mode(group: Mapping[str, Any]) -> str:
    return next((key for key in MODES if group.get(key) is not None), "")


def _scaled(ctx: StepContext, p: Tensor) -> Tensor:
    grad = ctx.scaled_gradient(p)
    assert grad is not None
    return grad.to_dense() if grad.is_sparse else grad


def _norm_dtype(grads: list[Tensor]) -> torch.dtype:
    return torch.float64 if any(g.dtype in (torch.float64, torch.complex128) for g in grads) else torch.float32


_NATIVE_DTYPES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}  # the kernels' element codes
_PLAIN = frozenset((torch.Tensor, torch.nn.Parameter))


def _native_norms(grads: list[Tensor], groups: list[dict[str, Any]]) -> Tensor | None:
    """The tensors' 2-norms (1-D, in :func:`_norm_dtype`) from the native kernels' sums of squares, or None.

    Taken where the native path would be (the kernels loaded, not under ``torch.compile``, no group
    with ``foreach`` set) and every gradient is a plain, dense, contiguous CPU tensor of float32,
    float64 or bfloat16. Each sum is exact up to double additions; its root is rounded to the
    gradient's dtype, as the norm of ``torch._foreach_norm`` is, and then to the common dtype.
    """
    if _is_compiling() or any(group.get("foreach") is not None for group in groups):
        return None
    lib = _native.load()
    if lib is None or not _native_ok(grads):
        return None
    n = len(grads)
    ptrs = np.fromiter(map(Tensor.data_ptr, grads), dtype=np.int64, count=n)
    numel = np.fromiter(map(Tensor.numel, grads), dtype=np.int64, count=n)
    codes = np.fromiter((_NATIVE_DTYPES[g.dtype] for g in grads), dtype=np.int32, count=n)
    sums = np.empty(n, dtype=np.float64)
    if lib.danlu_sum_squares(n, _addr(numel), _addr(ptrs), _addr(codes), torch.get_num_threads(), _addr(sums)) != 0:
        raise RuntimeError("danlu native kernel failed (sum of squares)")  # pragma: no cover - only known dtypes are sent
    norms = torch.from_numpy(sums).sqrt_()
    dtypes = set(map(_DTYPE, grads))
    if len(dtypes) == 1:
        return norms.to(dtypes.pop()).to(_norm_dtype(grads))
    for dtype in dtypes - {torch.float64}:
        rows = torch.from_numpy(codes == _NATIVE_DTYPES[dtype])
        norms[rows] = norms[rows].to(dtype).double()
    return norms.to(_norm_dtype(grads))


def _native_ok(grads: list[Tensor]) -> bool:
    return (
        set(map(type, grads)) <= _PLAIN
        and set(map(_DTYPE, grads)) <= _NATIVE_DTYPES.keys()
        and all(map(_IS_CPU, grads))
        and set(map(_LAYOUT, grads)) == {torch.strided}
        and all(map(Tensor.is_contiguous, grads))
    )


def _addr(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def _for_gradients(factor: Tensor, grads: list[Tensor]) -> Any:
    """The factor as the base step takes it: a Python number for sharded (DTensor) gradients."""
    if any_dtensor(grads) and not _is_compiling():
        return float(factor)
    return factor


def _report_norm(host: DerivationHost, total: Tensor) -> None:
    host.__dict__.setdefault("_danlu_reports", {})["grad_norm"] = total


def grad_norm(self: DerivationHost) -> Tensor | None:
    """The global gradient norm before clipping of the last applied step (a 0-d tensor; ``None`` before the first)."""
    return self.__dict__.get("_danlu_reports", {}).get("grad_norm")


def _nonfinite(host: DerivationHost, total: Tensor) -> bool:
    _report_norm(host, total)
    counter = next((d for d in host._danlu_derivations if hasattr(d, "count_skip")), None)
    if counter is not None:
        counter.count_skip(host)
    else:
        warnings.warn(
            f"the gradient norm is {float(total)}: this step is skipped (extend_with_skip_nonfinite counts and limits such skips)",
            RuntimeWarning,
            stacklevel=5,
        )
    return False


def _is_compiling() -> bool:
    return bool(torch.compiler.is_compiling())



GradientClipping.methods = {"grad_norm": property(grad_norm)}
