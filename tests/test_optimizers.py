"""Base optimizers: foreach equals the per-tensor oracle, torch.optim references, dtypes, params forms, sparse gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import danlu
from cases import OPTIMIZER_CASES, OptimizerCase, case_ids, gradients, named_params, run

FOREACH_CASES = [case for case in OPTIMIZER_CASES if case.has_foreach]
TORCH_REFERENCE_CASES = [case for case in OPTIMIZER_CASES if case.torch_reference is not None]
DENSE_ONLY_CASES = [case for case in OPTIMIZER_CASES if not case.supports_sparse]
UNNAMED_CASES = [case for case in OPTIMIZER_CASES if not case.needs_names]
FACTORED_CASES = [case for case in OPTIMIZER_CASES if case.factored]


@pytest.mark.parametrize("case", FOREACH_CASES, ids=case_ids(FOREACH_CASES))
def test_foreach_equals_per_tensor_oracle_float64(case: OptimizerCase) -> None:
    results = []
    for foreach in (False, True):
        params = named_params()
        opt = case.build(params, foreach=foreach)
        results.append(run(opt, params, gradients(params, 12)))
    for oracle, fast in zip(*results):
        torch.testing.assert_close(fast, oracle, rtol=case.tolerance, atol=case.tolerance)


@pytest.mark.parametrize("case", FOREACH_CASES, ids=case_ids(FOREACH_CASES))
def test_foreach_equals_per_tensor_oracle_float32(case: OptimizerCase) -> None:
    results = []
    for foreach in (False, True):
        params = named_params(torch.float32)
        opt = case.build(params, foreach=foreach)
        results.append(run(opt, params, gradients(params, 6)))
    for oracle, fast in zip(*results):
        torch.testing.assert_close(fast, oracle, rtol=2e-6, atol=2e-6)


@pytest.mark.usefixtures("float64")  # torch.optim keeps scalar state (NAdam's mu_product) in the default dtype
@pytest.mark.parametrize("case", TORCH_REFERENCE_CASES, ids=case_ids(TORCH_REFERENCE_CASES))
def test_equals_its_torch_optim_reference_float64(case: OptimizerCase) -> None:
    reference = case.torch_reference
    assert reference is not None
    params = named_params()
    ours = run(case.build(params), params, gradients(params, 10))
    params = named_params()
    theirs = run(reference.cls([p for _, p in params], **reference.kwargs, foreach=False), params, gradients(params, 10))
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=reference.tolerance, atol=reference.tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=case_ids(OPTIMIZER_CASES))
def test_every_dtype_steps_and_follows_float64(case: OptimizerCase, dtype: torch.dtype) -> None:
    reference_params = named_params(torch.float64)
    reference = run(case.build(reference_params), reference_params, gradients(reference_params, 3))
    params = named_params(dtype)
    result = run(case.build(params), params, gradients(params, 3))
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]
    for got, want in zip(result, reference):
        assert got.dtype == dtype
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("case", UNNAMED_CASES, ids=case_ids(UNNAMED_CASES))
def test_params_as_tensors_groups_or_named_pairs_agree(case: OptimizerCase) -> None:
    outcomes = []
    for form in ("tensors", "named", "groups"):
        params = named_params()
        if form == "tensors":
            arg: Any = [p for _, p in params]
        elif form == "named":
            arg = params
        else:
            arg = [{"params": [p for _, p in params[:2]]}, {"params": [p for _, p in params[2:]]}]
        outcomes.append(run(case.build(arg), params, gradients(params, 3)))
    for tensors, named, groups in zip(*outcomes):
        assert torch.equal(tensors, named) and torch.equal(tensors, groups)


@pytest.mark.parametrize("case", FACTORED_CASES, ids=case_ids(FACTORED_CASES))
def test_a_factored_matrix_keeps_row_and_column_state_only(case: OptimizerCase) -> None:
    """API.md section 1: the second moment of a factored matrix is O(rows + cols), never O(rows * cols)."""
    cols = case.kwargs.get("min_dim_size_to_factor", 128)
    rows = cols + 3
    w = torch.nn.Parameter(torch.randn(rows, cols, dtype=torch.float64))
    opt = case.build([("dense.kernel", w)])
    w.grad = torch.randn(rows, cols, dtype=torch.float64)
    opt.step()
    first_moment = rows * cols if case.kwargs.get("beta1") else 0
    sizes = {key: value.numel() for key, value in opt.state[w].items() if isinstance(value, torch.Tensor)}
    assert sum(sizes.values()) <= first_moment + rows + cols + 8, sizes  # + a few scalars (step, ...)


def test_per_group_hyperparameters() -> None:
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))
    opt = danlu.SGD([{"params": [a]}, {"params": [b], "lr": 0.5}], lr=0.1)
    a.grad = torch.ones(3)
    b.grad = torch.ones(3)
    opt.step()
    assert torch.allclose(a, torch.full((3,), 0.9)) and torch.allclose(b, torch.full((3,), 0.5))


def test_adam_matches_torch_adam_float32_fast_path() -> None:
    params = named_params(torch.float32)
    ours = run(danlu.Adam(params, lr=1e-2, eps=1e-8), params, gradients(params, 10))
    params = named_params(torch.float32)
    theirs = run(torch.optim.Adam([p for _, p in params], lr=1e-2, eps=1e-8, foreach=False), params, gradients(params, 10))
    for got, want in zip(ours, theirs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", DENSE_ONLY_CASES, ids=case_ids(DENSE_ONLY_CASES))
def test_sparse_gradient_is_rejected_before_anything_changes(case: OptimizerCase) -> None:
    emb = torch.nn.Embedding(5, 3, sparse=True)
    dense = torch.nn.Linear(3, 2)
    opt = case.build([("emb.weight", emb.weight), *dense.named_parameters()])
    before = [p.detach().clone() for p in (emb.weight, *dense.parameters())]
    dense(emb(torch.tensor([1, 2]))).sum().backward()
    with pytest.raises(ValueError, match="sparse") as error:
        opt.step()
    assert "emb.weight" in str(error.value)
    assert all(torch.equal(p, b) for p, b in zip((emb.weight, *dense.parameters()), before))
    assert not opt.state


def test_lazyadam_sparse_equals_dense_with_zero_rows() -> None:
    outcomes = []
    for sparse in (True, False):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(10, 4, sparse=sparse)
        opt = danlu.LazyAdam(emb.parameters(), lr=0.1)
        for ids in ([1, 2, 2], [3], [1, 7]):
            opt.zero_grad()
            (emb(torch.tensor(ids)) ** 2).sum().backward()
            opt.step()
        outcomes.append((emb.weight.detach().clone(), opt.state[emb.weight]["exp_avg"].clone()))
    torch.testing.assert_close(outcomes[0][0], outcomes[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(outcomes[0][1], outcomes[1][1], rtol=1e-6, atol=1e-7)


def test_lazyadam_leaves_absent_rows_and_their_state_untouched() -> None:
    emb = torch.nn.Embedding(6, 3, sparse=True)
    opt = danlu.LazyAdam(emb.parameters(), lr=0.1)
    (emb(torch.tensor([0, 5])) ** 2).sum().backward()
    opt.step()
    weight_before = emb.weight.detach().clone()
    m_before = opt.state[emb.weight]["exp_avg"].clone()
    opt.zero_grad()
    emb(torch.tensor([2])).sum().backward()
    opt.step()
    changed = (emb.weight.detach() != weight_before).any(dim=1).tolist()
    assert changed == [False, False, True, False, False, False]
    assert torch.equal(opt.state[emb.weight]["exp_avg"][[0, 5]], m_before[[0, 5]])


def test_relative_step_adafactor_lr() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    opt = danlu.Adafactor([w], lr=None, multiply_by_parameter_scale=False, clipping_threshold=None)
    expected = 0.0
    for t in range(1, 6):
        w.grad = torch.ones(3)
        opt.step()
        expected -= min(1 / t**0.5, 1e-2) * 0.05
        assert w[0].item() == pytest.approx(expected, rel=1e-4)


def test_closure_is_evaluated_with_grad_enabled() -> None:
    w = torch.nn.Parameter(torch.tensor([2.0]))
    opt = danlu.Adam([w], lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 4.0
    assert w.item() == pytest.approx(1.9)


def test_parameters_without_gradient_are_skipped() -> None:
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = danlu.Adam([a, b], lr=0.1)
    a.grad = torch.ones(2)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state
