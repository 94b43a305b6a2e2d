"""DDP and FSDP2 (gloo, 2 processes on 127.0.0.1) give the numbers of one process.

One spawn runs every case (``_dist_job.py``); each test reads its case's result. For every base
optimizer, every derivation, foreign bases and deep compositions, under DDP and under FSDP2
(``fully_shard``: DTensor parameters, gradients and state, uneven shards), the parameters after
every call, the whole optimizer state (Adafactor's factored statistics included) and the EMA
weights equal those of one process with the whole batch to 1e-6 (relative, float64; they agree to
about 1e-15). Then: gradient accumulation with DDP without an all-reduce on buffering calls,
non-finite gradients on one process only, and ``torch.distributed.checkpoint`` save/load of
derived optimizers under FSDP2: resumed training is bit-identical to never stopping, and the
checkpoint written by 2 processes loads in 1.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import _dist_job as job_cases
import danlu
from _dist_utils import run_job

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with gloo is not available",
)

TOL = 1e-6


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("dist")
    results = run_job(Path(job_cases.__file__), out, world_size=2, timeout=400)
    results["out"] = out
    return results


def result(job: dict[str, Any], name: str, rank: int = 0) -> Any:
    entry = job["ranks"][rank][name]
    assert entry["ok"], f"{name} raised on rank {rank}:\n{entry['error']}"
    return entry["result"]


EQUIVALENCE = [f"{mode}:{name}" for name in job_cases.CASES for mode in job_cases.MODES]


@pytest.mark.parametrize("case", EQUIVALENCE)
def test_trajectory_equals_one_process(job: dict[str, Any], case: str) -> None:
    for rank in (0, 1):
        r = result(job, case, rank)
        assert r["params_err"] <= TOL, f"parameters differ from one process by {r['params_err']:.3g}"
        assert r["state_err"] <= TOL, f"optimizer state differs from one process by {r['state_err']:.3g}"
        assert r["ema_err"] <= TOL, f"EMA weights differ from one process by {r['ema_err']:.3g}"
        assert r["counters"] == r["ref_counters"]
        if case.startswith("fsdp:"):
            assert r["all_dtensor_state"], "every state tensor of a sharded parameter is a DTensor"


def test_adafactor_statistics_are_whole_tensor_dtensors(job: dict[str, Any]) -> None:
    """A statistic reduced over the sharded axis is replicated; one that keeps it stays sharded."""
    placements = result(job, "fsdp:adafactor_relative_step_beta1")["adafactor_placements"]
    assert placements == {
        "emb.weight:exp_avg_sq_row": ["R"],  # (9, 6): mean over axis 0, the sharded one
        "emb.weight:exp_avg_sq_col": ["S(0)"],
        "proj:exp_avg_sq_row": ["R"],  # (6, 4, 5): factored over axes 0 and 2
        "proj:exp_avg_sq_col": ["S(0)"],
        "fc.weight:exp_avg_sq_row": ["S(0)"],  # (7, 20): largest axis 1
        "fc.weight:exp_avg_sq_col": ["R"],
    }


def test_ddp_accumulation_without_allreduce_on_buffering_calls(job: dict[str, Any]) -> None:
    r = result(job, "ddp_accumulation")
    # sync_on_apply: DDP never all-reduces; the optimizer averages once per applied step
    assert r["sync_on_apply"]["ddp_allreduces_per_call"] == [0] * job_cases.STEPS
    # plain DDP (no no_sync) is also right, with one all-reduce per call
    assert r["plain_ddp"]["ddp_allreduces_per_call"] == [1] * job_cases.STEPS
    for variant in ("sync_on_apply", "plain_ddp"):
        assert r[variant]["params_err"] <= TOL
        assert r[variant]["state_err"] <= TOL


def test_nonfinite_gradient_on_one_ddp_process_skips_the_call_everywhere(job: dict[str, Any]) -> None:
    for rank in (0, 1):
        r = result(job, "ddp_skip_nonfinite_local", rank)
        assert r["skips"] == 1
        assert r["calls"] == r["ref_calls"]
        assert r["params_err"] <= TOL and r["state_err"] <= TOL


def test_nonfinite_value_in_one_fsdp_shard_skips_the_call_everywhere(job: dict[str, Any]) -> None:
    for rank in (0, 1):
        r = result(job, "fsdp_skip_nonfinite_one_shard", rank)
        assert r["skips"] == 1
        assert r["applied"] == r["ref_applied"]
        assert r["params_err"] <= TOL and r["state_err"] <= TOL


@pytest.mark.parametrize("name", list(job_cases.DCP_SPECS))
def test_dcp_resume_is_bit_identical(job: dict[str, Any], name: str) -> None:
    for rank in (0, 1):
        r = result(job, f"dcp:{name}", rank)
        assert r["resume_max_abs_diff"] == 0.0
        assert r["resume_ema_max_abs_diff"] == 0.0
        # get_state_dict on a fresh optimizer runs one call with lr 0 and zero gradients to create the
        # state: for danlu it creates the state and is not a step
        assert r["calls_after_template"] == 0
        assert r["loaded_counters"][1] == job_cases.DCP_SAVE_AT
        assert r["loaded_schedule_key_types"] in ([], ["int"])


@pytest.mark.parametrize("name", list(job_cases.DCP_SPECS))
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_checkpoint_of_two_processes_loads_on_one(job: dict[str, Any], name: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    spec, kwargs = job_cases.DCP_SPECS[name]
    checkpoint = result(job, f"dcp:{name}")["checkpoint"]
    expected = torch.load(Path(job["out"]) / f"dcp-{name.replace('+', '_')}-final.pt")
    torch.manual_seed(5)
    model = job_cases.Net().double()
    opt = danlu.create_optimizer(model, spec, **copy.deepcopy(kwargs))
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    assert opt.param_groups[0]["calls"] == job_cases.DCP_SAVE_AT
    for batch in job_cases.batches(job_cases.DCP_CALLS, seed=7)[job_cases.DCP_SAVE_AT :]:
        job_cases.loss_fn(model, batch).backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected["final"][n], rtol=TOL, atol=TOL)
    with opt.ema_weights():
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), expected["final_ema"][n], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("name", ["fsdp_bf16", "fsdp_bf16_stochastic_rounding"])
def test_bf16_parameters_under_fsdp2_have_float32_dtensor_state(job: dict[str, Any], name: str) -> None:
    for rank in (0, 1):
        r = result(job, name, rank)
        assert r["param_dtypes"] == ["torch.bfloat16"] and r["state_dtypes"] == ["torch.float32"]
        assert r["state_is_dtensor"] and r["finite"]
        # bf16 gradients are summed in another order by the reduce-scatter: equal up to a bf16 ulp or two
        assert r["max_abs_diff"] <= 2.0**-5


def test_fsdp_spreads_muons_newton_schulz_over_the_processes(job: dict[str, Any]) -> None:
    """Each matrix is orthogonalized by exactly one process (gathered there, its result scattered back)."""
    done = []
    for rank in (0, 1):
        r = result(job, "fsdp_muon_spread", rank)
        assert r["params_err"] <= TOL and r["state_err"] <= TOL
        done.append(r["distributed_matrices_this_rank"])
    matrices = result(job, "fsdp_muon_spread")["matrices_per_step"]
    assert sum(done) == matrices * job_cases.STEPS
    assert all(0 < d < matrices * job_cases.STEPS for d in done)


def test_job_runtime_is_small(job: dict[str, Any]) -> None:
    """The whole distributed job (spawn included) stays well under the CI budget."""
    assert job["_wall_seconds"] < 120
