"""Muon: momentum, Newton-Schulz orthogonalization of the update matrix, and Adam for the rest."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from danlu._context import StepContext
from danlu._distributed import is_dtensor
from danlu._native_spec import Kernel, NativeSpec
from danlu._validate import check_betas, check_bool, check_int, check_number, check_patterns
from danlu.base import DanluOptimizer, ParamsT
from danlu.derivations._base import matches_any
from danlu.optimizers._moments import init_moments, update_moments, update_moments_foreach

__all__ = ["Muon", "newton_schulz", "batched_newton_schulz"]

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
BATCH_ON_CPU = False
"""Stack same-shape matrices into one ``bmm`` chain on the CPU too (see :func:`batched_newton_schulz`)."""
_ORTHOGONALIZED = "_danlu_muon_orthogonalized"
_STEP_CONTEXT = "_danlu_muon_step_context"
"""Instance attribute during a step: {id(group): {id(p): O}}, the batched Newton-Schulz results of the group."""


def newton_schulz(update: Tensor, coefficients: Sequence[float], steps: int, eps: float, dtype: torch.dtype) -> Tensor:
    """Orthogonalize a matrix (or a batch of matrices, the last two dimensions) in ``dtype``, as torch's Muon does.

    ``X = G / max(||G||_F, eps)`` (the transpose when there are more rows than columns), then
    ``steps`` times ``A = X X^T``, ``X = a X + (b A + c A A) X``. A 2-D input takes the very
    operations of ``torch.optim.Muon``; a 3-D batch takes one ``bmm`` chain for all its matrices.
    The result is in ``dtype`` and never shares memory with ``update``.

    Example:
        >>> import torch
        >>> o = newton_schulz(torch.eye(3) * 5, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float64)
        >>> round(float(o[0, 0]), 4)   # the singular values of the quintic iteration land near 1, not on it
        0.6858
    """
    a, b, c = coefficients
    x = update.to(dtype, copy=True)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    if x.dim() == 2:
        x.div_(x.norm().clamp(min=eps))
        for _ in range(steps):
            gram = x @ x.T
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.addmm(x, poly, x, beta=a)
    else:
        x.div_(torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps))
        for _ in range(steps):
            gram = torch.bmm(x, x.mT)
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if transposed else x


def adjusted_ratio(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """The factor of the lr for an ``rows x cols`` matrix: ``sqrt(max(1, A/B))`` or ``0.2 * sqrt(max(A, B))``."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1.0, rows / cols))


def _native_coefficients(group: Mapping[str, Any], state: Mapping[str, Any], lr: float, step: float) -> list[float]:
    """The Adam kernel's row (as ``danlu.optimizers.adam``'s, bias-corrected) with the Adam part's options."""
    beta1, beta2 = group["adam_betas"]
    return [1 - beta1, beta2, 1 - beta2, math.sqrt(1 - beta2**step), group["adam_eps"], -lr / (1 - beta1**step)]


def _matrix_shape(p: Tensor) -> tuple[int, int]:
    return p.shape[0], math.prod(p.shape[1:])


class Muon(DanluOptimizer):
    r"""Muon (Jordan et al., 2024; Liu et al., "Muon is Scalable for LLM Training", 2025), one optimizer for a whole model.

    For a tensor with two or more dimensions (flattened to :math:`A \times B`, ``(shape[0],
    prod(shape[1:]))``) whose name matches no ``exclude_from_muon`` pattern, exactly
    ``torch.optim.Muon`` with ``weight_decay=0``:

    .. math::

        B_t = \mu B_{t-1} + (1-\mu) g_t, \qquad
        U_t = \begin{cases} (1-\mu) g_t + \mu B_t & \text{nesterov} \\ B_t & \text{otherwise} \end{cases}

        O_t = \mathrm{NS}^{(a,b,c)}_k(U_t), \qquad \theta_t = \theta_{t-1} - \eta\, r\, O_t

    with :math:`\mathrm{NS}` the quintic Newton-Schulz iteration (:func:`newton_schulz`) computed in
    ``ns_dtype``, and :math:`r = \sqrt{\max(1, A/B)}` (``adjust_lr_fn`` ``None`` or ``"original"``) or
    :math:`r = 0.2\sqrt{\max(A, B)}` (``"match_rms_adamw"``).

    Every other tensor (0-D, 1-D, or named by ``exclude_from_muon``: embeddings, the output head)
    gets the bias-corrected Adam update of Moonlight's recipe, in the same step, with
    ``adam_betas``, ``adam_eps`` and the group's lr:
    :math:`\theta_t = \theta_{t-1} - \eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon_{adam})`. Give those
    tensors another lr with a parameter group. ``extend_with_weight_decay(Muon)`` is torch's decoupled
    decay (:math:`\eta\lambda\theta_{t-1}` with the unadjusted lr).

    With the default ``foreach=None`` on accelerators, the momentum and Newton-Schulz of all the
    matrices of a group run before its updates are written, the matrices of one shape in one
    batched ``bmm`` chain (held in ``ns_dtype`` until written); on the CPU, where that measured
    no faster, each matrix is orthogonalized in its own update (see :func:`batched_newton_schulz`).
    The Adam part of a CPU group runs danlu's native Adam kernel (one pass per tensor, as
    :class:`~danlu.Adam`). ``foreach=False`` is the per-tensor reference. Under FSDP2 Newton-Schulz sees whole matrices:
    each is gathered on one process, orthogonalized there, and every process gets its rows of the
    result back (the reference loop gathers each matrix on every process instead).

    Args:
        params: tensors, parameter groups or ``(name, tensor)`` pairs (names for ``exclude_from_muon``).
        lr: learning rate :math:`\eta`.
        momentum: :math:`\mu` in [0, 1).
        nesterov: use the Nesterov form :math:`U_t` above.
        ns_coefficients: :math:`(a, b, c)`, three finite numbers.
        ns_steps: Newton-Schulz iterations :math:`k`, an int in [1, 100).
        eps: floor of the Frobenius norm that normalizes :math:`U_t` (>= 0).
        adjust_lr_fn: ``None``, ``"original"`` or ``"match_rms_adamw"``.
        ns_dtype: floating-point dtype of the Newton-Schulz iteration (bfloat16 as torch; float32 or float64 for exactness).
        adam_betas: :math:`(\beta_1, \beta_2)` of the Adam part, each in [0, 1).
        adam_eps: :math:`\epsilon_{adam} \ge 0`.
        exclude_from_muon: regular expressions (``re.search``) of parameter names that take the Adam update.
        foreach: ``False`` runs the per-tensor reference loop.
        state_dtype: dtype of the state and the arithmetic (default: float32 for 16-bit parameters, else theirs).
        stochastic_rounding: round bfloat16 parameter writes stochastically (unbiased; see ``danlu._precision``).

    Example:
        >>> import torch, danlu
        >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 4))
        >>> opt = danlu.Muon(model.named_parameters(), lr=0.02, exclude_from_muon=[r"^0\."])
        >>> model(torch.tensor([1, 2])).sum().backward(); _ = opt.step()
        >>> sorted(opt.state[model[1].weight]), sorted(opt.state[model[0].weight])
        (['momentum_buffer', 'step'], ['exp_avg', 'exp_avg_sq', 'step'])
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
        ns_steps: int = 5,
        eps: float = 1e-7,
        adjust_lr_fn: str | None = None,
        ns_dtype: torch.dtype = torch.bfloat16,
        adam_betas: tuple[float, float] = (0.9, 0.95),
        adam_eps: float = 1e-8,
        exclude_from_muon: Any = (),
        *,
        foreach: bool | None = None,
        state_dtype: torch.dtype | None = None,
        stochastic_rounding: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            ns_steps=ns_steps,
            eps=eps,
            adjust_lr_fn=adjust_lr_fn,
            ns_dtype=ns_dtype,
            adam_betas=adam_betas,
            adam_eps=adam_eps,
            exclude_from_muon=exclude_from_muon,
        )
        check_patterns("exclude_from_muon", exclude_from_muon)
        super().__init__(params, defaults, foreach=foreach, state_dtype=state_dtype, stochastic_rounding=stochastic_rounding)
        for group in self.param_groups:
            if group["exclude_from_muon"] and "param_names" not in group:
                raise ValueError(
                    "exclude_from_muon matches parameter names, but this optimizer was built without names: "
                    "pass model.named_parameters()"
                )

    # ------------------------------------------------------------ checks
    def _check_hyperparameters(self, options: Mapping[str, Any]) -> None:
        super()._check_hyperparameters(options)
        check_number("momentum", options["momentum"], low=0.0, high=1.0, high_open=True)
        check_bool("nesterov", options["nesterov"])
        _check_coefficients(options["ns_coefficients"])
        if check_int("ns_steps", options["ns_steps"], low=1) >= 100:
            raise ValueError(f"Invalid ns_steps: {options['ns_steps']!r} (expected an int >= 1 and < 100)")
        check_number("eps", options["eps"], low=0.0)
        if options["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise ValueError(
                f"Invalid adjust_lr_fn: {options['adjust_lr_fn']!r} (expected None, 'original' or 'match_rms_adamw')"
            )
        dtype = options["ns_dtype"]
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"Invalid ns_dtype: expected a torch.dtype, got {type(dtype).__name__} {dtype!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"Invalid ns_dtype: {dtype} (expected a floating-point dtype)")
        check_betas("adam_betas", options["adam_betas"])
        check_number("adam_eps", options["adam_eps"], low=0.0)

    def _validate_group(self, group: dict[str, Any]) -> None:
        group["exclude_from_muon"] = check_patterns("exclude_from_muon", group["exclude_from_muon"])
        super()._validate_group(group)

    def _check_gradients(self) -> None:
        super()._check_gradients()
        for group in self.param_groups:
            for name, p in zip(self._names(group), group["params"]):
                if p.grad is not None and (p.is_complex() or p.grad.is_complex()):
                    label = f"parameter {name!r}" if name else "a parameter"
                    raise ValueError(f"Muon does not support complex parameters or gradients ({label} is complex)")

    # ------------------------------------------------------------- roles
    def uses_adam(self, group: Mapping[str, Any], p: Tensor, name: str | None = None) -> bool:
        """Whether ``p`` takes the Adam update: fewer than two dimensions, or a name matching ``exclude_from_muon``."""
        if p.dim() < 2:
            return True
        patterns = group["exclude_from_muon"]
        if not patterns:
            return False
        name = name if name is not None else self._param_name(group, p)
        return name is not None and matches_any(tuple(patterns), name)

    def _defer_mean(self, ctx: StepContext, group: dict[str, Any], p: Tensor, buffer: Tensor, steps: int) -> bool:
        # only the Adam part takes the kernels; the whole-group Newton-Schulz pass reads a matrix's gradient itself
        return self.uses_adam(group, p) and super()._defer_mean(ctx, group, p, buffer, steps)

    def _owner(self, group: Mapping[str, Any], p: Tensor, state: Mapping[str, Any]) -> Tensor:
        """The parameter whose state is ``state`` (``_init_state`` may get a converted copy of it)."""
        if self._param_name(group, p) is not None:
            return p
        return next((q for q in group["params"] if self.state.get(q) is state), p)

    def _init_state(self, p: Tensor, state: dict[str, Any], group: Mapping[str, Any]) -> None:
        if self.uses_adam(group, self._owner(group, p, state)):
            init_moments(p, state)
        else:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _state_template(self, p: Tensor, group: Mapping[str, Any]) -> dict[str, Any]:
        """The state that the first step creates for parameter ``p`` (meta tensors; ``load_state_dict`` checks it)."""
        template: dict[str, Any] = {"step": torch.zeros(())}
        meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
        own = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        name = self._param_name(own, p) if own is not None else None
        if self.uses_adam(group, p, name):
            init_moments(meta, template)
        else:
            template["momentum_buffer"] = torch.zeros_like(meta)
        return template

    # ------------------------------------------------------------ updates
    native: ClassVar[NativeSpec | None] = NativeSpec(Kernel.ADAM, lambda group: ("exp_avg", "exp_avg_sq"), _native_coefficients)
    """The Adam part runs the native Adam kernel; a matrix's state has no ``exp_avg``, so the kernels leave it here."""

    def _update_single(
        self, group: Mapping[str, Any], p: Tensor, grad: Tensor, state: dict[str, Any], lr: float, step: float
    ) -> Tensor:
        if "exp_avg" in state:
            return self._adam_update(group, state, grad, lr, step)
        ortho = self._take_orthogonalized(group, p)
        if ortho is None:
            ortho = self._orthogonalize(group, p, _nesterov_update(group, state, grad))
        return self._scaled(group, p, ortho, grad.dtype, lr)

    def _update_foreach(
        self,
        group: Mapping[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        states: list[dict[str, Any]],
        lrs: list[float],
        steps: list[float],
    ) -> list[Tensor]:
        adam = [i for i, s in enumerate(states) if "exp_avg" in s]
        adam_updates: dict[int, Tensor] = {}
        if adam:
            computed = self._adam_foreach(
                group, [grads[i] for i in adam], [states[i] for i in adam], [lrs[i] for i in adam], [steps[i] for i in adam]
            )
            adam_updates = dict(zip(adam, computed))
        return [
            adam_updates[i] if i in adam_updates else self._update_single(group, p, g, s, lr, t)
            for i, (p, g, s, lr, t) in enumerate(zip(params, grads, states, lrs, steps))
        ]

    def _adam_update(self, group: Mapping[str, Any], state: dict[str, Any], grad: Tensor, lr: float, step: float) -> Tensor:
        beta1, beta2 = group["adam_betas"]
        exp_avg, exp_avg_sq = update_moments(state, grad, (beta1, beta2))
        denom = exp_avg_sq.sqrt().div_(_sqrt_correction(beta2, step)).add_(group["adam_eps"])
        return _divide_into(exp_avg, denom).mul_(-lr / (1 - beta1**step))

    def _adam_foreach(
        self, group: Mapping[str, Any], grads: list[Tensor], states: list[dict[str, Any]], lrs: list[float], steps: list[float]
    ) -> list[Tensor]:
        beta1, beta2 = group["adam_betas"]
        exp_avgs, exp_avg_sqs = update_moments_foreach(states, grads, (beta1, beta2))
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, [_sqrt_correction(beta2, t) for t in steps])
        torch._foreach_add_(denom, group["adam_eps"])
        updates = [_divide_into(m, d) for m, d in zip(exp_avgs, denom)]
        torch._foreach_mul_(updates, [-lr / (1 - beta1**t) for lr, t in zip(lrs, steps)])
        return updates

    def _scaled(self, group: Mapping[str, Any], p: Tensor, ortho: Tensor, dtype: torch.dtype, lr: float) -> Tensor:
        """``-lr * ratio * O`` in the compute dtype, shaped like ``p``."""
        rows, cols = _matrix_shape(p)
        update = ortho.reshape(p.shape).to(dtype)  # ortho is this step's own tensor: scaling it in place is safe
        return update.mul_(-lr * adjusted_ratio(group["adjust_lr_fn"], rows, cols))

    def _orthogonalize(self, group: Mapping[str, Any], p: Tensor, update: Tensor) -> Tensor:
        """NS of one tensor's update flattened to a matrix (the whole matrix of a sharded one), shaped like ``p``."""
        whole = _whole(update, group["ns_dtype"])
        ortho = newton_schulz(
            whole.reshape(_matrix_shape(p)), group["ns_coefficients"], group["ns_steps"], group["eps"], group["ns_dtype"]
        ).reshape(p.shape)
        return _shard_like(ortho, update)

    # ------------------------------------------- the whole-group batch (the one override of the skeleton's step)
    def _group_step(self, ctx: StepContext, group: dict[str, Any], scale: float) -> None:
        """The skeleton's group step; the Newton-Schulz results batched over the group live only during it.

        The first update that needs an orthogonalized matrix runs :meth:`_orthogonalize_group`
        for every matrix of the group at once (one ``bmm`` chain per shape); the chunks of the
        skeleton then take their matrices from it.
        """
        self.__dict__[_STEP_CONTEXT] = ctx
        try:
            super()._group_step(ctx, group, scale)
        finally:
            self.__dict__.pop(_ORTHOGONALIZED, None)
            self.__dict__.pop(_STEP_CONTEXT, None)

    def _take_orthogonalized(self, group: Mapping[str, Any], p: Tensor) -> Tensor | None:
        if group.get("foreach") is False:
            return None
        batches: dict[int, dict[int, Tensor]] = self.__dict__.setdefault(_ORTHOGONALIZED, {})
        if id(group) not in batches:
            batches[id(group)] = self._orthogonalize_group(group) if _group_pass_pays(group) else {}
        return batches[id(group)].pop(id(p), None)

    def _orthogonalize_group(self, group: Mapping[str, Any]) -> dict[int, Tensor]:
        """Momentum and Newton-Schulz for every Muon matrix of ``group`` that has a gradient: {id(p): O}.

        Row-sharded matrices (FSDP2) are spread over the processes (:func:`_spread_newton_schulz`);
        the others are orthogonalized here, all of one shape in one batch.
        """
        from danlu._precision import compute_dtype

        ctx: StepContext = self.__dict__[_STEP_CONTEXT]
        entries: list[tuple[Tensor, Tensor]] = []  # (parameter, its update)
        for p in group["params"]:
            state = self.state.get(p)
            grad = ctx.gradient(p)
            if grad is None or not state or "momentum_buffer" not in state:
                continue
            dtype = compute_dtype(p, group.get("state_dtype"))
            grad = grad if grad.dtype == dtype else grad.to(dtype)
            factor = ctx.scales.get(id(p))  # as the skeleton's generic path applies a gradient scale (clipping)
            entries.append((p, _nesterov_update(group, state, grad if factor is None else grad * factor)))
        spread = [e for e in entries if _row_sharded(e[1])]
        here = [e for e in entries if not _row_sharded(e[1])]
        matrices = [_whole(u, group["ns_dtype"]).reshape(_matrix_shape(p)) for p, u in here]
        results = {id(p): _shard_like(o.reshape(p.shape), u) for (p, u), o in zip(here, batched_newton_schulz(group, matrices))}
        if spread:
            results.update(_spread_newton_schulz(group, spread))
        return results


def batched_newton_schulz(group: Mapping[str, Any], matrices: list[Tensor]) -> list[Tensor]:
    """:func:`newton_schulz` of each matrix with ``group``'s options; same-shape ones (after transposition) in one batch.

    On the CPU (unless :data:`BATCH_ON_CPU`) the matrices go one by one: the products are
    compute-bound there and a ``bmm`` chain is no faster than the ``mm`` chains (10-20% slower in
    danlu's measurements); on accelerators one chain per shape replaces a chain of kernel launches
    per matrix.
    """
    buckets: dict[tuple[Any, ...], list[int]] = {}
    for i, matrix in enumerate(matrices):
        rows, cols = matrix.shape
        one_by_one = matrix.device.type == "cpu" and not BATCH_ON_CPU
        buckets.setdefault((min(rows, cols), max(rows, cols), matrix.device, i if one_by_one else -1), []).append(i)
    results: list[Tensor | None] = [None] * len(matrices)
    for (small, large, device, _), members in buckets.items():
        if len(members) == 1:
            i = members[0]
            results[i] = newton_schulz(matrices[i], group["ns_coefficients"], group["ns_steps"], group["eps"], group["ns_dtype"])
            continue
        stacked = torch.empty((len(members), small, large), dtype=group["ns_dtype"], device=device)
        for row, i in enumerate(members):
            matrix = matrices[i]
            stacked[row].copy_(matrix.mT if matrix.size(0) > matrix.size(1) else matrix)
        ortho = newton_schulz(stacked, group["ns_coefficients"], group["ns_steps"], group["eps"], group["ns_dtype"])
        for row, i in enumerate(members):
            results[i] = ortho[row].mT if matrices[i].size(0) > matrices[i].size(1) else ortho[row]
    return [o for o in results if o is not None]


def _sqrt_correction(beta2: float, step: Any) -> Any:
    """``sqrt(1 - beta2**step)``: a tensor for a tensor step (a traced step), else a float."""
    return (1 - beta2**step).sqrt() if isinstance(step, Tensor) else math.sqrt(1 - beta2**step)


def _group_pass_pays(group: Mapping[str, Any]) -> bool:
    """Whether the whole-group pass gains anything: batching off the CPU, or spreading sharded matrices.

    On the CPU, without sharding, the matrices are orthogonalized one by one anyway, and doing that
    in each tensor's own update keeps one orthogonalized matrix alive at a time instead of all of them.
    """
    matrices = [p for p in group["params"] if p.dim() >= 2 and p.grad is not None]
    return any(p.device.type != "cpu" or BATCH_ON_CPU or _row_sharded(p) for p in matrices)


def _row_sharded(update: Tensor) -> bool:
    """Whether ``update`` is a DTensor sharded by rows over a 1-D mesh of several processes (FSDP2's layout)."""
    if not is_dtensor(update) or update.device_mesh.ndim != 1 or update.device_mesh.size() < 2:
        return False
    placement = update.placements[0]
    return placement.is_shard() and getattr(placement, "dim", None) == 0


def _owners(shapes: list[tuple[int, int]], world: int) -> list[int]:
    """The process that orthogonalizes each matrix: the largest first, each to the least loaded (by flops)."""
    load = [0] * world
    owners = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: -(min(shapes[i]) ** 2) * max(shapes[i])):
        owner = min(range(world), key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += min(shapes[i]) ** 2 * max(shapes[i])
    return owners


def _spread_newton_schulz(group: Mapping[str, Any], entries: list[tuple[Tensor, Tensor]]) -> dict[int, Tensor]:
    """Newton-Schulz of row-sharded matrices, each on one process: gather its rows there, scatter the result back.

    Every process sends its rows of each matrix (in ``ns_dtype``, padded to equal chunks) to the
    matrix's owner, the owners orthogonalize their matrices (batched by shape), and each process
    receives its rows of every result. Per matrix the wire carries ``2 (W-1)/W`` of it, and each
    process orthogonalizes about ``1/W`` of the flops.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    dtype = group["ns_dtype"]
    results: dict[int, Tensor] = {}
    meshes: dict[int, list[tuple[Tensor, DTensor]]] = {}
    for p, update in entries:
        assert isinstance(update, DTensor)
        meshes.setdefault(id(update.device_mesh), []).append((p, update))
    for members in meshes.values():
        mesh = members[0][1].device_mesh
        process_group, world, me = mesh.get_group(), mesh.size(), mesh.get_local_rank()
        shapes = [_matrix_shape(p) for p, _ in members]
        owners = _owners(shapes, world)
        received: dict[int, Tensor] = {}
        for i, ((_, update), (rows, cols), owner) in enumerate(zip(members, shapes, owners)):
            local = update.to_local().to(dtype).reshape(-1, cols)
            chunk = -(-rows // world)
            padded = local.new_zeros((chunk, cols))
            padded[: local.shape[0]].copy_(local)
            pieces = [torch.empty_like(padded) for _ in range(world)] if me == owner else None
            dist.gather(padded, pieces, dst=dist.get_global_rank(process_group, owner), group=process_group)
            if pieces is not None:
                received[i] = torch.cat(pieces)[:rows]
        mine = sorted(received)
        ortho = dict(zip(mine, batched_newton_schulz(group, [received[i] for i in mine])))
        for i, ((p, update), (rows, cols), owner) in enumerate(zip(members, shapes, owners)):
            chunk = -(-rows // world)
            shard = update.to_local()
            out = torch.empty((chunk, cols), dtype=dtype, device=shard.device)
            scattered = None
            if i in ortho:
                full = ortho[i].new_zeros((chunk * world, cols))
                full[:rows].copy_(ortho[i])
                scattered = list(full.split(chunk))
            dist.scatter(out, scattered, src=dist.get_global_rank(process_group, owner), group=process_group)
            local_ortho = out[: shard.shape[0]].reshape(shard.shape)
            results[id(p)] = DTensor.from_local(
                local_ortho, mesh, update.placements, run_check=False, shape=update.shape, stride=update.stride()
            )
    return results


def _divide_into(numerator: Tensor, denom: Tensor) -> Tensor:
    """``numerator / denom`` written into ``denom``: no new parameter-sized tensor (a fresh large one costs page faults)."""
    if is_dtensor(denom):
        return denom.reciprocal_().mul_(numerator)
    return torch.div(numerator, denom, out=denom)


def _nesterov_update(group: Mapping[str, Any], state: dict[str, Any], grad: Tensor) -> Tensor:
    """Advance the momentum buffer; return the matrix to orthogonalize (Nesterov form or the buffer)."""
    momentum = group["momentum"]
    buf = state["momentum_buffer"]
    buf.lerp_(grad, 1 - momentum)
    return grad.lerp(buf, momentum) if group["nesterov"] else buf


def _whole(update: Tensor, dtype: torch.dtype) -> Tensor:
    """The whole matrix of a sharded update (gathered in the Newton-Schulz dtype: half the bytes in bfloat16), else the update."""
    if not is_dtensor(update):
        return update
    converted = update.to(dtype)
    return converted.full_tensor() if is_dtensor(converted) else converted


def _shard_like(whole: Tensor, ref: Tensor) -> Tensor:
    """``whole`` (a plain tensor) as a DTensor placed like ``ref`` when ``ref`` is one; this process keeps its shard."""
    if not is_dtensor(ref):
        return whole
    from torch.distributed.tensor import DTensor, Replicate

    replicated = DTensor.from_local(whole, ref.device_mesh, [Replicate()] * ref.device_mesh.ndim, run_check=False)
    return replicated.redistribute(ref.device_mesh, ref.placements)


def _check_coefficients(coefficients: Any) -> None:
    if isinstance(coefficients, (str, bytes)) or not isinstance(coefficients, Sequence):
        raise TypeError(f"Invalid ns_coefficients: expected a tuple of 3 numbers, got {coefficients!r}")
    if len(coefficients) != 3:
        raise ValueError(f"Invalid ns_coefficients: expected 3 values, got {len(coefficients)} ({coefficients!r})")
    for index, value in enumerate(coefficients):
        check_number(f"ns_coefficients[{index}]", value)
