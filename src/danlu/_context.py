"""What one ``step()`` carries across the derivation hooks, the base step and the native driver.

A :class:`StepContext` lives for one call of :meth:`danlu._host.DerivationHost.step` and is handed to
every hook that needs more than the optimizer: nothing of a step is kept on the optimizer itself.

The gradient a base optimizer uses for a parameter is ``ctx.gradient(p)``: ``p.grad`` unless a
derivation replaced it (gradient accumulation's mean, a clamped gradient), times ``ctx.grad_scale(p)``
(gradient clipping), which danlu's native kernels fold into their gradient coefficient and every other
path multiplies in (:meth:`StepContext.scaled_gradient`). The caller's ``p.grad`` is never written.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from danlu._host import DerivationHost

__all__ = ["StepContext"]


class StepContext:
    """The working data of one ``step()``.

    Attributes:
        lr_scales: per param group, the product of the derivations' lr multipliers.
        replaced: ``id(p) -> gradient`` where a derivation replaced ``p.grad`` for this step.
        scales: ``id(p) -> factor`` by which the gradient of ``p`` is multiplied for this step.
        pending_means: ``id(p) -> (buffer, k)``: accumulated gradients whose mean ``(p.grad + buffer) / k``
            the native kernel forms in its pass (it clears the buffer and leaves ``p.grad`` alone).
        pending_groups: ``id(group) -> (buffers, buffer pointers, k)``: the same for every tensor of a group,
            recorded once for the group (the buffers in the order of ``group["params"]``).
        fused_after: ``(derivation index, id(group)) -> ids of parameters`` whose ``after_step`` the
            native kernel already did (Lookahead's sync, EMA).
        cleanup: callables run once the step has finished, succeeded or not (argument: failed).
        applies: under ``torch.compile``, a 0-dim bool tensor where gradient accumulation decides
            whether this call applies a step (None: it does); see :class:`danlu._host._Gate`.
        counts: under ``torch.compile``, a 0-dim bool tensor where a derivation's ``skip`` decides
            whether this call counts at all (None: it does); a call that does not count changes nothing
            but the skipping derivation's own counters.
        gate_exempt: ids of the tensors that a call which counts but does not apply keeps as written (the buffers).
        dropped: whether a gradient hook dropped this step (nothing else changed).
        grads: ``id(group) -> [p.grad for p in group["params"]]`` as the eager step read them when it began.
    """

    __slots__ = (
        "applies",
        "cleanup",
        "counts",
        "dropped",
        "fused_after",
        "gate_exempt",
        "grads",
        "host",
        "lr_scales",
        "pending_groups",
        "pending_means",
        "replaced",
        "scales",
    )

    def __init__(self, host: DerivationHost) -> None:
        self.host = host
        self.lr_scales: list[Any] = [1.0] * len(host.param_groups)
        self.replaced: dict[int, Tensor] = {}
        self.scales: dict[int, Any] = {}
        self.pending_means: dict[int, tuple[Tensor, int]] = {}
        self.pending_groups: dict[int, tuple[list[Tensor], Any, int]] = {}
        self.fused_after: dict[tuple[int, int], set[int]] = {}
        self.cleanup: list[Any] = []
        self.applies: Tensor | None = None
        self.counts: Tensor | None = None
        self.gate_exempt: set[int] = set()
        self.dropped = False
        read = host._step_gradients() or []
        self.grads: dict[int, list[Any]] = {id(g): r for g, r in zip(host.param_groups, read)}

    def group_gradients(self, group: dict[str, Any]) -> list[Any]:
        """``[p.grad for p in group["params"]]`` (read once per eager step; derivations never write ``p.grad``)."""
        grads = self.grads.get(id(group))
        return grads if grads is not None else [p.grad for p in group["params"]]

    def gradient(self, p: Tensor) -> Tensor | None:
        """The gradient the base step uses for ``p``, before any scale (``p.grad`` unless replaced)."""
        return self.replaced.get(id(p), p.grad)

    def grad_scale(self, p: Tensor) -> Any:
        """The factor the gradient of ``p`` is multiplied by in this step (1.0, a float or a 0-d tensor)."""
        return self.scales.get(id(p), 1.0)

    def scaled_gradient(self, p: Tensor) -> Tensor | None:
        """``gradient(p) * grad_scale(p)``: a new tensor where a scale applies, else the gradient itself."""
        grad = self.gradient(p)
        scale = self.scales.get(id(p))
        if grad is None or scale is None:
            return grad
        return grad * scale

    def replace(self, p: Tensor, grad: Tensor) -> None:
        """Use ``grad`` instead of ``p.grad`` in this step (the caller's tensor is left as it is)."""
        self.replaced[id(p)] = grad

    def scale(self, p: Tensor, factor: Any) -> None:
        """Multiply the gradient of ``p`` by ``factor`` in this step (on top of any earlier scale)."""
        previous = self.scales.get(id(p))
        self.scales[id(p)] = factor if previous is None else previous * factor

    def params_with_gradient(self) -> Iterator[tuple[dict[str, Any], Tensor]]:
        """Every ``(group, p)`` whose gradient this step uses, over all groups."""
        for group in self.host.param_groups:
            for p in group["params"]:
                if self.gradient(p) is not None:
                    yield group, p

    def finish(self, failed: bool) -> None:
        for action in self.cleanup:
            action(failed)
        self.cleanup.clear()
