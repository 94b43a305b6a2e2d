"""The step that every danlu optimizer and every derived optimizer runs.

:class:`DerivationHost` is a mixin over ``torch.optim.Optimizer``. It owns the
order of the derivation hooks (see :mod:`danlu.derivations._base`) and leaves one
method to its subclasses, ``_base_step(lr_scales)``: apply one step of the
underlying algorithm with each group's learning rate multiplied by its scale,
handing every proposed update to :meth:`DerivationHost._apply_transforms` before
it is written. danlu's own optimizers do that on the update they compute (no
parameter copy); a foreign optimizer is run on a snapshot of only the parameters
that some transform selects (:class:`danlu.derive.ForeignHost`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim.optimizer import required

from danlu._params import normalize_group
from danlu._state import check_state_dict, keep_state_dtypes, restore_derivation_state
from danlu.derivations._base import APPLIED_STEPS, CALLS, Derivation

__all__ = ["DerivationHost"]


class DerivationHost(torch.optim.Optimizer):
    """Mixin: the derivation-aware ``step`` shared by danlu's and derived foreign optimizers."""

    _danlu_derivations: ClassVar[tuple[Derivation, ...]] = ()
    _danlu_overrides: dict[str, Any]

    # ---------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = normalize_group(param_group, "param_group")
        for key, default in self.defaults.items():
            if default is not required:
                group.setdefault(key, copy.deepcopy(default))
        if self._danlu_derivations:
            self._fill_derivation_options(group)
        self._validate_group(group)
        super().add_param_group(group)

    def _fill_derivation_options(self, group: dict[str, Any]) -> None:
        overrides = getattr(self, "_danlu_overrides", {})
        for derivation in self._danlu_derivations:
            for key, default in derivation.defaults.items():
                if key not in group:
                    group[key] = copy.deepcopy(overrides.get(key, default))
            group.update(derivation.validate(group))
        existing = getattr(self, "param_groups", None)
        template = existing[0] if existing else {}
        group.setdefault(APPLIED_STEPS, template.get(APPLIED_STEPS, 0))
        group.setdefault(CALLS, template.get(CALLS, 0))

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check the algorithm's hyperparameters of one group (danlu's optimizers override this)."""

    # ----------------------------------------------------------------- state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict after checking that it fits (a ``ValueError`` says what does not; nothing changes).

        Unlike ``torch.optim``, the dtypes of the saved state are kept (torch casts floating-point
        state to the parameter dtype), so float32 state of bf16 parameters stays float32. The
        derivations' entries are set aside while the base optimizer loads its own, so that a base
        which inspects its state on load sees only what it wrote.
        """
        check_state_dict(self, state_dict)
        keys = {key for d in self._danlu_derivations for key in d.state_keys}
        base_part = {
            **state_dict,
            "state": {pid: {k: v for k, v in entry.items() if k not in keys} for pid, entry in state_dict["state"].items()},
        }
        super().load_state_dict(base_part)
        restore_derivation_state(self, state_dict, keys)
        keep_state_dtypes(self, state_dict)
        self.__dict__.pop("_danlu_name_cache", None)

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step (or, under gradient accumulation, buffer one gradient)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_gradients()
        derivations = self._danlu_derivations
        if not derivations:
            self._base_step([1.0] * len(self.param_groups))
            return loss
        if not all([d.accumulate(self) for d in derivations]):
            self._count(CALLS)
            return loss
        failed = True
        try:
            scales = [math.prod(d.lr_multiplier(g) for d in derivations) for g in self.param_groups]
            for derivation in derivations:
                for group in self.param_groups:
                    derivation.prepare(self, group, group["params"])
            self._base_step(scales)
            self._count(CALLS)
            self._count(APPLIED_STEPS)
            for derivation in derivations:
                for group in self.param_groups:
                    derivation.after_step(self, group, group["params"])
            failed = False
        finally:
            for derivation in derivations:
                derivation.finish(self, failed)
        return loss

    def _count(self, key: str) -> None:
        for group in self.param_groups:
            group[key] += 1

    def _check_gradients(self) -> None:
        """Reject gradients the algorithm cannot take, before anything changes."""

    def _base_step(self, lr_scales: Sequence[float]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------ transforms
    def _has_transforms(self) -> bool:
        return any(d.has_transform for d in self._danlu_derivations)

    def _selected_by_any(self, group: dict[str, Any], name: str | None) -> bool:
        return any(d.has_transform and d.selects(group, name) for d in self._danlu_derivations)

    def _apply_transforms(
        self,
        group: dict[str, Any],
        olds: list[Tensor],
        updates: list[Tensor],
        grads: list[Tensor],
        names: list[str | None],
        lrs: list[float],
    ) -> None:
        """Run every transform derivation, innermost first, over the tensors it selects."""
        for derivation in self._danlu_derivations:
            if not derivation.has_transform:
                continue
            chosen = [i for i, name in enumerate(names) if derivation.selects(group, name)]
            if not chosen:
                continue
            if len(chosen) == len(names):
                derivation.transform(self, group, olds, updates, grads, names, lrs)
            else:
                derivation.transform(
                    self,
                    group,
                    [olds[i] for i in chosen],
                    [updates[i] for i in chosen],
                    [grads[i] for i in chosen],
                    [names[i] for i in chosen],
                    [lrs[i] for i in chosen],
                )

    @staticmethod
    def _names(group: dict[str, Any]) -> list[str | None]:
        names = group.get("param_names")
        return list(names) if names is not None else [None] * len(group["params"])
