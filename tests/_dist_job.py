"""The distributed job of ``test_distributed.py``: every case, in one spawn of 2 gloo processes.

Run as ``python _dist_job.py RANK WORLD STORE OUT`` (see ``_dist_utils.run_job``). Every rank runs
every case; the references (one process, the whole batch, plain tensors) are computed on every
rank; rank 0 writes ``OUT/results.json``: for each case the largest error against the reference
and the facts the tests check. A case that raises records its traceback instead.

The model has the shapes that matter under FSDP2's ``Shard(0)``: an embedding whose rows split
unevenly (9 rows on 2 processes: 5 and 4) with rows no batch touches (lazy updates), a 3-D tensor,
a matrix whose largest axis is the unsharded one, 1-D vectors, and a (1,)-shaped bias of which one
process holds an empty shard. With ``min_dim_size_to_factor=4`` Adafactor factors the three
matrices, over the sharded axis (embedding) and over the other ones.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

import danlu

STEPS = 6
BATCH = 8
TOKENS = 7  # embedding rows 7 and 8 never appear: their gradient rows are zero


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.proj = nn.Parameter(torch.randn(6, 4, 5) * 0.3)
        self.fc = nn.Linear(20, 7)
        self.norm = nn.LayerNorm(7)
        self.out = nn.Linear(7, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.emb(tokens).mean(1)
        h = torch.einsum("bi,ijk->bjk", h, self.proj).flatten(1)
        h = self.norm(torch.tanh(self.fc(h)))
        return self.out(h).squeeze(-1)


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def batches(count: int = STEPS, seed: int = 123) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, TOKENS, (BATCH, 3), generator=g), torch.randn(BATCH, generator=g, dtype=torch.float64))
        for _ in range(count)
    ]


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    tokens, target = batch
    return (model(tokens) - target).pow(2).mean()


def shard_of(batch: tuple[torch.Tensor, torch.Tensor], rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = BATCH // world
    return batch[0][rank * size : (rank + 1) * size], batch[1][rank * size : (rank + 1) * size]


# ------------------------------------------------------------------------------ the case table
# name -> (create_optimizer spec, hyperparameters). Every base optimizer, every derivation (on Adam),
# foreign bases, and deep compositions.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", dict(lr=0.1)),
    "sgdm": ("sgdm", dict(lr=0.05)),
    "nag": ("nag", dict(lr=0.05)),
    "adagrad": ("adagrad", dict(lr=0.1, initial_accumulator_value=0.1)),
    "adadelta": ("adadelta", dict(lr=1.0)),
    "rmsprop_centered_momentum": ("rmsprop", dict(lr=0.01, momentum=0.5, centered=True)),
    "adam": ("adam", dict(lr=0.01)),
    "nadam": ("nadam", dict(lr=0.01)),
    "radam": ("radam", dict(lr=0.01)),
    "adafactor_relative_step_beta1": ("adafactor", dict(lr=None, beta1=0.5, min_dim_size_to_factor=4)),
    "adafactor_lr_no_scale_no_clip": (
        "adafactor",
        dict(lr=0.01, beta2=0.9, multiply_by_parameter_scale=False, clipping_threshold=None, min_dim_size_to_factor=4),
    ),
    "lion": ("lion", dict(lr=0.01)),
    "lazyadam": ("lazyadam", dict(lr=0.01)),
    "adam+weight_decay": ("adam+weight_decay", dict(lr=0.01, weight_decay_rate=0.1)),
    "adam+layer_adaptation": ("adam+layer_adaptation", dict(lr=0.01, exclude_from_layer_adaptation=["norm"])),
    "adam+piecewise_linear_lr": ("adam+piecewise_linear_lr", dict(lr=0.01, lr_schedule={2: 1.0, 4: 0.5})),
    "adam+gradient_accumulation": ("adam+gradient_accumulation", dict(lr=0.01, grad_accum_steps=2)),
    "adam+lookahead": ("adam+lookahead", dict(lr=0.01, steps_per_slow_update=2)),
    "adam+lazy": ("adam+lazy", dict(lr=0.01, include_in_lazy_optimization=["emb", "bias"])),
    "adam+ema": ("adam+ema", dict(lr=0.01, ema_momentum=0.5)),
    "adam+paramwise_lr": ("adam+paramwise_lr", dict(lr=0.01, paramwise_lr_schedule={"emb": 0.1, "fc": 2.0})),
    "adam+skip_nonfinite": ("adam+skip_nonfinite", dict(lr=0.01)),
    "torch.AdamW+lookahead+ema": ("torch.AdamW+lookahead+ema", dict(lr=0.01, steps_per_slow_update=2, ema_momentum=0.5)),
    "torch.SGD+weight_decay+layer_adaptation": (
        "torch.SGD+weight_decay+layer_adaptation",
        dict(lr=0.1, momentum=0.9, weight_decay_rate=0.01),
    ),
    "lamb+lookahead+ema": ("lamb+lookahead+ema", dict(lr=0.01, steps_per_slow_update=2, ema_momentum=0.5)),
    "adafactor+accum+ema": (
        "adafactor+gradient_accumulation+ema",
        dict(lr=None, min_dim_size_to_factor=4, grad_accum_steps=2, ema_momentum=0.5),
    ),
    "lazyadam+weight_decay+layer_adaptation": ("lazyadam+weight_decay+layer_adaptation", dict(lr=0.01)),
    "lion+layer_adaptation+warmup": ("lion+layer_adaptation+warmup", dict(lr=0.01, lr_schedule={0: 0.5, 3: 1.0})),
    "adamw+clip": ("adamw+clip", dict(lr=0.01, global_clipnorm=0.05)),
    "lamb+accum+clip": ("lamb+gradient_accumulation+clip", dict(lr=0.01, grad_accum_steps=2, global_clipnorm=0.05)),
    "adam+clipnorm": ("adam+clip", dict(lr=0.01, clipnorm=0.02)),
    "muon": ("muon", dict(lr=0.02, ns_dtype=torch.float32)),
    "muon+weight_decay": ("muon+weight_decay", dict(lr=0.02, weight_decay_rate=0.1, ns_dtype=torch.float32)),
    "muon+accum+lookahead+ema": (
        "muon+gradient_accumulation+lookahead+ema",
        dict(lr=0.02, ns_dtype=torch.float32, adjust_lr_fn="match_rms_adamw", grad_accum_steps=2, steps_per_slow_update=2),
    ),
    "adam+schedule_free": ("adam+schedule_free", dict(lr=0.01, schedule_free_momentum=0.8, average_power=0.5)),
    "torch.Adam+schedule_free": ("torch.Adam+schedule_free", dict(lr=0.01)),
    "adamw+everything": (
        "adamw+lazy+paramwise_lr+piecewise_linear_lr+gradient_accumulation+lookahead+ema+skip_nonfinite",
        dict(
            lr=0.01,
            include_in_lazy_optimization=["emb"],
            paramwise_lr_schedule={"fc": 0.5},
            lr_schedule={0: 0.2, 2: 1.0},
            grad_accum_steps=2,
            steps_per_slow_update=2,
            ema_momentum=0.5,
        ),
    ),
}

MODES = ("ddp", "fsdp")
DCP_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "lamb+warmup+accum+lookahead+ema": (
        "lamb+piecewise_linear_lr+gradient_accumulation+lookahead+ema+skip_nonfinite",
        dict(
            lr=0.01,
            lr_schedule={0: 0.5, 3: 1.0},
            grad_accum_steps=2,
            steps_per_slow_update=2,
            ema_momentum=0.5,
            exclude_from_layer_adaptation=("bias", "norm"),
        ),
    ),
    "adafactor+accum+ema": (
        "adafactor+gradient_accumulation+ema",
        dict(lr=None, beta1=0.5, min_dim_size_to_factor=4, grad_accum_steps=3, ema_momentum=0.5),
    ),
    "muon+accum+schedule_free+ema": (
        "muon+gradient_accumulation+schedule_free+ema",
        dict(lr=0.02, ns_dtype=torch.float32, grad_accum_steps=2, ema_momentum=0.5),
    ),
}
DCP_SAVE_AT = 3
DCP_CALLS = 7


def build(spec: str, kwargs: dict[str, Any], model: nn.Module) -> torch.optim.Optimizer:
    return danlu.create_optimizer(model, spec, **copy.deepcopy(kwargs))


# ------------------------------------------------------------------------------ comparisons
def full(t: torch.Tensor) -> torch.Tensor:
    from danlu._distributed import is_dtensor

    return t.full_tensor() if is_dtensor(t) else t


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = full(a).detach().double(), full(b).detach().double()
    if a.shape != b.shape:
        return math.inf
    if a.numel() == 0:
        return 0.0
    return float(((a - b).abs() / b.abs().clamp(min=1.0)).max())


def params_err(model: nn.Module, ref: nn.Module) -> float:
    ours = dict(model.named_parameters())
    return max(rel_err(ours[n], p) for n, p in ref.named_parameters())


def state_err(opt: torch.optim.Optimizer, model: nn.Module, ref_opt: torch.optim.Optimizer, ref: nn.Module) -> float:
    ours = dict(model.named_parameters())
    worst = 0.0
    for name, p in ref.named_parameters():
        ref_state, state = ref_opt.state[p], opt.state[ours[name]]
        if set(ref_state) != set(state):
            return math.inf
        for key, value in sorted(ref_state.items()):  # one order on every rank: full() is a collective
            if isinstance(value, torch.Tensor):
                err = rel_err(state[key], value)
                if err > 1e-6 and os.environ.get("DANLU_DIST_DEBUG"):
                    print("state", name, key, err, full(state[key]), value, flush=True)
                worst = max(worst, err)
    return worst


def ema_err(opt: Any, model: nn.Module, ref_opt: Any, ref: nn.Module) -> float:
    if not hasattr(ref_opt, "ema_weights"):
        return 0.0
    with ref_opt.ema_weights(), opt.ema_weights():
        return params_err(model, ref)


# ------------------------------------------------------------------------------ runners
def reference_run(
    spec: str, kwargs: dict[str, Any], data: list[Any], drop: tuple[int, ...] = ()
) -> tuple[nn.Module, torch.optim.Optimizer, list[dict[str, torch.Tensor]]]:
    """One process, the whole batch; the trajectory after every call (calls in ``drop`` are left out)."""
    model = make_net()
    opt = build(spec, kwargs, model)
    trajectory = []
    for i, batch in enumerate(data):
        if i in drop:
            trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})
            continue
        loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
        trajectory.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return model, opt, trajectory


def distributed_model(mode: str) -> tuple[nn.Module, nn.Module]:
    """(the module to run, the module whose named parameters the optimizer takes)."""
    model = make_net()
    if mode == "ddp":
        ddp = nn.parallel.DistributedDataParallel(model)
        return ddp, model
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.fc)
    fully_shard(model)
    return model, model


def trajectory_err(model: nn.Module, trajectory: list[dict[str, torch.Tensor]], i: int) -> float:
    ours = dict(model.named_parameters())
    return max(rel_err(ours[n], ref) for n, ref in trajectory[i].items())


def equivalence(mode: str, spec: str, kwargs: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    data = batches()
    ref, ref_opt, trajectory = reference_run(spec, kwargs, data)
    runner, model = distributed_model(mode)
    opt = build(spec, kwargs, model)
    worst = 0.0
    for i, batch in enumerate(data):
        loss_fn(runner, shard_of(batch, rank, world)).backward()
        opt.step()
        opt.zero_grad()
        worst = max(worst, trajectory_err(model, trajectory, i))
    out = {
        "params_err": worst,
        "state_err": state_err(opt, model, ref_opt, ref),
        "ema_err": ema_err(opt, model, ref_opt, ref),
        "counters": [(g.get("applied_steps"), g.get("calls")) for g in opt.param_groups],
        "ref_counters": [(g.get("applied_steps"), g.get("calls")) for g in ref_opt.param_groups],
    }
    if mode == "fsdp":
        from danlu._distributed import is_dtensor

        out["all_dtensor_state"] = all(
            is_dtensor(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0
        )
        if spec.startswith("adafactor"):
            out["adafactor_placements"] = {
                f"{n}:{k}": [str(pl) for pl in v.placements]
                for n, p in model.named_parameters()
                for k, v in opt.state[p].items()
                if k.startswith("exp_avg_sq_")
            }
    return out


def ddp_accumulation(rank: int, world: int) -> dict[str, Any]:
    """DDP + gradient accumulation with danlu.distributed.sync_on_apply: no all-reduce on buffering calls."""
    import torch.distributed.algorithms.ddp_comm_hooks.default_hooks as hooks

    spec, kwargs = "adamw+gradient_accumulation+lookahead", dict(lr=0.01, grad_accum_steps=3, steps_per_slow_update=2)
    data = batches()
    ref, ref_opt, trajectory = reference_run(spec, kwargs, data)
    results: dict[str, Any] = {}
    for variant in ("sync_on_apply", "plain_ddp"):
        model = make_net()
        ddp = nn.parallel.DistributedDataParallel(model)
        calls = {"n": 0}

        def counting_hook(state, bucket):  # type: ignore[no-untyped-def]  (DDP checks the annotations)
            calls["n"] += 1
            return hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_hook)
        opt = build(spec, kwargs, model)
        worst = 0.0
        reduces = []
        for i, batch in enumerate(data):
            before = calls["n"]
            if variant == "sync_on_apply":
                with danlu.distributed.sync_on_apply(ddp, opt):
                    loss_fn(ddp, shard_of(batch, rank, world)).backward()
            else:
                loss_fn(ddp, shard_of(batch, rank, world)).backward()
            opt.step()
            opt.zero_grad()
            reduces.append(calls["n"] - before)
            worst = max(worst, trajectory_err(model, trajectory, i))
        results[variant] = {
            "params_err": worst,
            "state_err": state_err(opt, model, ref_opt, ref),
            "ddp_allreduces_per_call": reduces,
        }
    return results


def ddp_skip_nonfinite_local(rank: int, world: int) -> dict[str, Any]:
    """sync_on_apply leaves buffering calls' gradients local: a nan on one rank must skip the call on all."""
    spec, kwargs = "adam+gradient_accumulation+skip_nonfinite", dict(lr=0.01, grad_accum_steps=2)
    data = batches()
    bad_call = 2  # a buffering call (calls 0, 2, 4 buffer with k=2 ... counted among the calls that remain)
    ref, ref_opt, trajectory = reference_run(spec, kwargs, data, drop=(bad_call,))
    model = make_net()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = build(spec, kwargs, model)
    worst = 0.0
    for i, batch in enumerate(data):
        with danlu.distributed.sync_on_apply(ddp, opt):
            loss_fn(ddp, shard_of(batch, rank, world)).backward()
        if i == bad_call and rank == 1:
            model.fc.weight.grad[0, 0] = math.nan
        opt.step()
        opt.zero_grad()
        worst = max(worst, trajectory_err(model, trajectory, i))
    group = opt.param_groups[0]
    # the buffers hold each process's own sum (sync_on_apply): their mean over the processes is the reference's
    import torch.distributed as dist

    for p in model.parameters():
        buffer = opt.state[p]["accum.grad"]
        dist.all_reduce(buffer)
        buffer.div_(world)
    return {
        "params_err": worst,
        "state_err": state_err(opt, model, ref_opt, ref),
        "skips": group["nonfinite_skips"],
        "calls": group["calls"],
        "ref_calls": ref_opt.param_groups[0]["calls"],
    }


def fsdp_skip_nonfinite_one_shard(rank: int, world: int) -> dict[str, Any]:
    """A nan in one process's shard: every process skips the call (one all-reduce of the verdict)."""
    spec, kwargs = "lamb+lookahead+skip_nonfinite", dict(lr=0.01, steps_per_slow_update=2)
    data = batches()
    bad_call = 3
    ref, ref_opt, trajectory = reference_run(spec, kwargs, data, drop=(bad_call,))
    runner, model = distributed_model("fsdp")
    opt = build(spec, kwargs, model)
    worst = 0.0
    for i, batch in enumerate(data):
        loss_fn(runner, shard_of(batch, rank, world)).backward()
        if i == bad_call and rank == 1:
            model.emb.weight.grad.to_local()[0, 0] = math.inf
        opt.step()
        opt.zero_grad()
        worst = max(worst, trajectory_err(model, trajectory, i))
    return {
        "params_err": worst,
        "state_err": state_err(opt, model, ref_opt, ref),
        "skips": opt.param_groups[0]["nonfinite_skips"],
        "applied": opt.param_groups[0]["applied_steps"],
        "ref_applied": ref_opt.param_groups[0]["applied_steps"],
    }


def dcp_resume(name: str, rank: int, world: int, out: Path) -> dict[str, Any]:
    """Save (DCP) after DCP_SAVE_AT calls, go on; load into a fresh model and optimizer, go on: equal."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    spec, kwargs = DCP_SPECS[name]
    data = batches(DCP_CALLS, seed=7)
    checkpoint = out / f"dcp-{name.replace('+', '_')}"
    runner, model = distributed_model("fsdp")
    opt = build(spec, kwargs, model)
    for i, batch in enumerate(data):
        if i == DCP_SAVE_AT:
            model_sd, optim_sd = get_state_dict(model, opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(checkpoint))
        loss_fn(runner, shard_of(batch, rank, world)).backward()
        opt.step()
        opt.zero_grad()
    final = {n: full(p).detach().clone() for n, p in model.named_parameters()}
    with opt.ema_weights():
        final_ema = {n: full(p).detach().clone() for n, p in model.named_parameters()}

    torch.manual_seed(99)  # a fresh model with other weights: the checkpoint must bring everything back
    fresh = Net().double()
    from torch.distributed.fsdp import fully_shard

    fully_shard(fresh.fc)
    fully_shard(fresh)
    fresh_opt = build(spec, kwargs, fresh)
    model_sd, optim_sd = get_state_dict(fresh, fresh_opt)
    calls_after_template = int(fresh_opt.param_groups[0]["calls"])  # a number: DCP loads into the counter tensors
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(checkpoint))
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    loaded_group = {k: v for k, v in fresh_opt.param_groups[0].items() if k not in ("params", "param_names")}
    for batch in data[DCP_SAVE_AT:]:
        loss_fn(fresh, shard_of(batch, rank, world)).backward()
        fresh_opt.step()
        fresh_opt.zero_grad()
    resumed = {n: full(p).detach().clone() for n, p in fresh.named_parameters()}
    with fresh_opt.ema_weights():
        resumed_ema = {n: full(p).detach().clone() for n, p in fresh.named_parameters()}
    if rank == 0:
        torch.save({"final": final, "final_ema": final_ema}, out / f"dcp-{name.replace('+', '_')}-final.pt")
    return {
        "resume_max_abs_diff": max(float((resumed[n] - final[n]).abs().max()) for n in final),
        "resume_ema_max_abs_diff": max(float((resumed_ema[n] - final_ema[n]).abs().max()) for n in final),
        "calls_after_template": calls_after_template,
        "loaded_lr_schedule": {str(k): v for k, v in loaded_group.get("lr_schedule", {}).items()},
        "loaded_schedule_key_types": sorted({type(k).__name__ for k in loaded_group.get("lr_schedule", {})}),
        "loaded_counters": [int(loaded_group["applied_steps"]), int(loaded_group["calls"])],
        "loaded_patterns": repr(loaded_group.get("exclude_from_layer_adaptation")),
        "checkpoint": str(checkpoint),
    }


def fsdp_bf16(rank: int, world: int, stochastic: bool) -> dict[str, Any]:
    """bf16 parameters under FSDP2: float32 DTensor state, the trajectory of one process (to bf16 rounding)."""
    spec = "adamw+gradient_accumulation+lookahead+ema"
    kwargs = dict(lr=0.01, grad_accum_steps=2, steps_per_slow_update=2, ema_momentum=0.5, stochastic_rounding=stochastic)
    data = batches()
    ref = make_net().to(torch.bfloat16)
    ref_opt = build(spec, kwargs, ref)
    model = make_net().to(torch.bfloat16)
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.fc)
    fully_shard(model)
    opt = build(spec, kwargs, model)
    for batch in data:
        tokens, target = batch
        (ref(tokens) - target.to(torch.bfloat16)).float().pow(2).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        tokens, target = shard_of(batch, rank, world)
        (model(tokens) - target.to(torch.bfloat16)).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    from danlu._distributed import is_dtensor

    ours = dict(model.named_parameters())
    diffs = [float((full(ours[n]).float() - p.float()).abs().max()) for n, p in ref.named_parameters()]
    return {
        "max_abs_diff": max(diffs),
        "param_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "state_dtypes": sorted(
            {str(v.dtype) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0}
        ),
        "state_is_dtensor": all(
            is_dtensor(v) for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0
        ),
        "finite": all(bool(torch.isfinite(full(p)).all()) for p in model.parameters()),
    }


def fsdp_muon_spread(rank: int, world: int) -> dict[str, Any]:
    """Under FSDP2 each Muon matrix is orthogonalized by one process: count the matrices each process does."""
    from danlu.optimizers import muon

    counted: list[int] = []
    original = muon.newton_schulz

    def counting(update: torch.Tensor, *args: Any) -> torch.Tensor:
        counted.append(update.shape[0] if update.dim() == 3 else 1)
        return original(update, *args)

    muon.newton_schulz = counting  # type: ignore[assignment]
    try:
        result = equivalence("fsdp", "muon", dict(lr=0.02, ns_dtype=torch.float32), rank, world)
    finally:
        muon.newton_schulz = original
    matrices = sum(1 for p in make_net().parameters() if p.dim() >= 2) - 1  # the embedding takes Adam
    # the reference run (one process, plain tensors) orthogonalizes every matrix of every step here too
    result["matrices_per_step"] = matrices
    result["distributed_matrices_this_rank"] = sum(counted) - matrices * STEPS
    return result


def jobs(rank: int, world: int, out: Path) -> list[tuple[str, Callable[[], Any]]]:
    table: list[tuple[str, Callable[[], Any]]] = []
    for name, (spec, kwargs) in CASES.items():
        for mode in MODES:
            table.append((f"{mode}:{name}", lambda m=mode, s=spec, k=kwargs: equivalence(m, s, k, rank, world)))
    table.append(("ddp_accumulation", lambda: ddp_accumulation(rank, world)))
    table.append(("ddp_skip_nonfinite_local", lambda: ddp_skip_nonfinite_local(rank, world)))
    table.append(("fsdp_skip_nonfinite_one_shard", lambda: fsdp_skip_nonfinite_one_shard(rank, world)))
    table.append(("fsdp_muon_spread", lambda: fsdp_muon_spread(rank, world)))
    table.append(("fsdp_bf16", lambda: fsdp_bf16(rank, world, stochastic=False)))
    table.append(("fsdp_bf16_stochastic_rounding", lambda: fsdp_bf16(rank, world, stochastic=True)))
    for name in DCP_SPECS:
        table.append((f"dcp:{name}", lambda n=name: dcp_resume(n, rank, world, out)))
    return table


def main() -> None:
    rank, world, store, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=timedelta(seconds=90))
    only = os.environ.get("DANLU_DIST_ONLY")
    results: dict[str, Any] = {}
    for name, job in jobs(rank, world, out):
        if only and only not in name:
            continue
        start = time.perf_counter()
        try:
            results[name] = {"ok": True, "result": job()}
        except Exception:
            results[name] = {"ok": False, "error": traceback.format_exc()}
        results[name]["seconds"] = time.perf_counter() - start
        dist.barrier()
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(out / "results.json", "w") as f:
            json.dump({"ranks": gathered}, f, default=str)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
