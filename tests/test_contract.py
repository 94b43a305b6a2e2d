"""torch.optim's generic contract (API.md section 8), over every row of the optimizer table and derived stacks.

Modelled on the generic tests of torch's ``test/test_optim.py``: state-dict round trips and hooks,
deepcopy, printing, ``zero_grad``, ``add_param_group``, steps without gradients, weights-only
loading, complex parameters, memory layouts, a tensor lr, foreach against the per-tensor loop, and
``step()`` leaving ``.grad`` alone. Cases that fail today are listed in ``KNOWN_FAILURES``: strict
expected failures pinned to the exception they raise now, so that a fix (or a different failure)
shows up as a failure of this module.

The first tests check the tables themselves: every public optimizer and derivation has a row.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch

import danlu
from cases import DERIVATIONS, OPTIMIZER_CASES, OptimizerCase, stack_case

# ------------------------------------------------------------------------------ the tables cover everything
ABSTRACT = {"DanluOptimizer"}  # the base class of danlu's optimizers: not an algorithm


def _optimizer_classes(module: Any, names: list[str]) -> dict[str, type]:
    objects = {name: getattr(module, name) for name in names}
    return {
        name: obj
        for name, obj in objects.items()
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and name not in ABSTRACT
    }


def test_every_optimizer_class_has_a_row() -> None:
    public = {
        **{f"danlu.optimizers.{n}": c for n, c in _optimizer_classes(danlu.optimizers, list(danlu.optimizers.__all__)).items()},
        **{f"danlu.{n}": c for n, c in _optimizer_classes(danlu, list(danlu.__all__)).items()},
    }
    covered = {case.cls for case in OPTIMIZER_CASES}
    missing = sorted(name for name, cls in public.items() if cls not in covered)
    assert not missing, f"no row in tests/cases.py OPTIMIZER_CASES for: {', '.join(missing)}"


def test_every_factory_optimizer_name_has_a_row() -> None:
    specs = {case.spec for case in OPTIMIZER_CASES}
    missing = [name for name in danlu.factory.OPTIMIZER_NAMES if name not in specs]
    assert not missing, f"no row in tests/cases.py OPTIMIZER_CASES with spec= {', '.join(map(repr, missing))}"
    unknown = sorted(str(s) for s in specs - {None} if s not in danlu.factory.OPTIMIZER_NAMES)
    assert not unknown, f"rows name specs that create_optimizer does not know: {unknown}"


@pytest.mark.parametrize("case", [c for c in OPTIMIZER_CASES if c.spec], ids=lambda c: c.id)
def test_a_row_spec_builds_the_row_class(case: OptimizerCase) -> None:
    pairs = [("dense.kernel", torch.nn.Parameter(torch.ones(2, 3))), ("dense.bias", torch.nn.Parameter(torch.ones(3)))]
    assert type(danlu.create_optimizer(pairs, case.spec or "", **case.kwargs)) is case.cls


def test_every_derivation_has_a_row() -> None:
    registered = {f"danlu.derivations.ALL_DERIVATIONS: {d.name!r}": d.name for d in danlu.derivations.ALL_DERIVATIONS}
    registered.update({f"danlu.factory.DERIVATION_NAMES: {n!r}": n for n in danlu.factory.DERIVATION_NAMES})
    missing = sorted(where for where, name in registered.items() if name not in DERIVATIONS)
    assert not missing, f"no row in tests/cases.py DERIVATION_CASES for: {', '.join(missing)}"
    factories = {case.factory for case in DERIVATIONS.values()}
    public = {n: getattr(danlu, n) for n in danlu.__all__ if n.startswith("extend_with_")}
    missing = sorted(f"danlu.{n}" for n, f in public.items() if f not in factories)
    assert not missing, f"no row in tests/cases.py DERIVATION_CASES for: {', '.join(missing)}"


@pytest.mark.filterwarnings("ignore:.*matches no parameter name")
@pytest.mark.parametrize("name", list(DERIVATIONS))
def test_a_derivation_row_name_builds_the_row_factory_class(name: str) -> None:
    case = DERIVATIONS[name]
    pairs = [("dense.kernel", torch.nn.Parameter(torch.ones(2, 3))), ("dense.bias", torch.nn.Parameter(torch.ones(3)))]
    built = danlu.create_optimizer(pairs, f"adam+{name}", lr=0.1, **case.kwargs)
    assert type(built).__name__ == case.factory(danlu.Adam).__name__


def test_row_ids_are_unique() -> None:
    ids = [case.id for case in CONTRACT_CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


# ------------------------------------------------------------------------------ rows, and what fails today
STACK_CASES: list[OptimizerCase] = [
    stack_case("adam", ["weight_decay", "lookahead"]),
    stack_case("adam", ["gradient_accumulation", "piecewise_linear_lr"], grad_accum_steps=2, lr_schedule={0: 0.5, 3: 1.0}),
    stack_case("adam", ["paramwise_lr", "lazy", "ema"]),
    stack_case("torch.AdamW", ["gradient_accumulation", "ema"], grad_accum_steps=2),
    stack_case("torch.SGD", ["weight_decay"]),
]
CONTRACT_CASES: list[OptimizerCase] = OPTIMIZER_CASES + STACK_CASES


KNOWN_FAILURES: dict[str, dict[str, tuple[str, type[BaseException]]]] = {}
"""Contract -> row id -> (reason, exception): cases that fail today, marked as strict expected failures."""


def rows(contract: str, selected: list[OptimizerCase] | None = None) -> list[Any]:
    """The table's rows as pytest params, each known failure of ``contract`` marked as a strict xfail."""
    known = KNOWN_FAILURES.get(contract, {})
    out = []
    for case in CONTRACT_CASES if selected is None else selected:
        marks = []
        if case.id in known:
            reason, raises = known[case.id]
            marks.append(pytest.mark.xfail(strict=True, raises=raises, reason=reason))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


def test_known_failures_name_existing_rows() -> None:
    ids = {case.id for case in CONTRACT_CASES}
    unknown = sorted(f"{contract}: {row}" for contract, known in KNOWN_FAILURES.items() for row in known if row not in ids)
    assert not unknown, f"KNOWN_FAILURES names rows that do not exist: {unknown}"


# ------------------------------------------------------------------------------ parameters, gradients, runs
SHAPES: dict[str, tuple[int, ...]] = {
    "embeddings.weight": (6, 4),
    "dense.kernel": (4, 5),
    "dense.bias": (5,),
    "LayerNorm.gamma": (5,),
    "output.kernel": (3, 5),
}
STEPS = 4

Pairs = list[tuple[str, torch.nn.Parameter]]


def make_pairs(seed: int = 0, dtype: torch.dtype = torch.float64, shapes: dict[str, tuple[int, ...]] = SHAPES) -> Pairs:
    generator = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=generator, dtype=dtype))) for n, s in shapes.items()]


def grads_for(pairs: Pairs, call: int) -> list[torch.Tensor]:
    """The gradients of call ``call``: random, with one all-zero embedding row (lazy updates show)."""
    generator = torch.Generator().manual_seed(1000 + call)
    out = []
    for name, p in pairs:
        g = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        if name.startswith("embeddings"):
            g[call % p.shape[0]] = 0
        out.append(g)
    return out


def train(opt: torch.optim.Optimizer, pairs: Pairs, calls: range) -> None:
    for call in calls:
        for (_, p), g in zip(pairs, grads_for(pairs, call)):
            p.grad = g
        opt.step()


def copy_values(target: Pairs, source: Pairs) -> None:
    with torch.no_grad():
        for (_, p), (_, q) in zip(target, source):
            p.copy_(q)


def same(a: Any, b: Any, path: str = "") -> None:
    """Assert ``a`` and ``b`` (state dicts, lists of tensors) are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: {type(b).__name__} is not a tensor"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype} {tuple(a.shape)} != {b.dtype} {tuple(b.shape)}"
        assert torch.equal(a, b), f"{path}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for key in a:
            same(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def params_of(pairs: Pairs) -> list[torch.Tensor]:
    return [p.detach().clone() for _, p in pairs]


def assert_moved(after: list[torch.Tensor], before: list[torch.Tensor]) -> None:
    assert any(not torch.equal(a, b) for a, b in zip(after, before)), "no parameter moved: the comparison would show nothing"


def close(got: list[torch.Tensor], want: list[torch.Tensor], tolerance: float, what: str, initial: list[torch.Tensor]) -> None:
    """``got`` equals ``want`` to ``tolerance``, and ``want`` moved away from ``initial`` (no comparison of two no-ops)."""
    assert any(not torch.equal(w, i) for w, i in zip(want, initial)), f"{what}: nothing moved"
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance, msg=lambda m: f"{what}, tensor {i}: {m}")


# ------------------------------------------------------------------------------ state dicts
@pytest.mark.parametrize("case", rows("state_dict"))
def test_state_dict_round_trip_and_a_fresh_optimizer_continues_bit_identically(case: OptimizerCase) -> None:
    pairs = make_pairs()
    opt = case.build(pairs)
    train(opt, pairs, range(STEPS))
    saved = copy.deepcopy(opt.state_dict())
    fresh_pairs = make_pairs(seed=1)
    copy_values(fresh_pairs, pairs)
    fresh = case.build(fresh_pairs)
    fresh.load_state_dict(saved)
    same(fresh.state_dict(), opt.state_dict(), "state_dict after loading")
    at_save = params_of(pairs)
    train(opt, pairs, range(STEPS, STEPS + 3))
    train(fresh, fresh_pairs, range(STEPS, STEPS + 3))
    assert_moved(params_of(pairs), at_save)
    same(params_of(fresh_pairs), params_of(pairs), "parameters")
    same(fresh.state_dict(), opt.state_dict(), "state_dict")


@pytest.mark.parametrize("case", rows("determinism"))
def test_two_identical_runs_are_equal(case: OptimizerCase) -> None:
    outcomes = []
    for _ in range(2):
        pairs = make_pairs()
        opt = case.build(pairs)
        train(opt, pairs, range(STEPS))
        outcomes.append((params_of(pairs), opt.state_dict()))
    same(outcomes[0], outcomes[1])


@pytest.mark.parametrize("case", rows("weights_only"))
def test_weights_only_save_and_load_resumes(case: OptimizerCase) -> None:
    pairs = make_pairs()
    opt = case.build(pairs)
    train(opt, pairs, range(STEPS))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh_pairs = make_pairs(seed=1)
    copy_values(fresh_pairs, pairs)
    fresh = case.build(fresh_pairs)
    fresh.load_state_dict(loaded)
    at_save = params_of(pairs)
    train(opt, pairs, range(STEPS, STEPS + 3))
    assert_moved(params_of(pairs), at_save)
    train(fresh, fresh_pairs, range(STEPS, STEPS + 3))
    same(params_of(fresh_pairs), params_of(pairs), "parameters")


# ------------------------------------------------------------------------------ hooks
def _instantiate_torch_base(cls: type) -> None:
    """Make one plain instance of the torch.optim class under ``cls``: torch patches a class's step at its first one."""
    for klass in cls.__mro__:
        if getattr(torch.optim, klass.__name__, None) is klass and klass is not torch.optim.Optimizer:
            klass([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
            return


@pytest.mark.parametrize("case", rows("step_hooks"))
def test_step_hooks_run_once_per_step_around_the_whole_step(case: OptimizerCase) -> None:
    _instantiate_torch_base(case.cls)
    pairs = make_pairs()
    opt = case.build(pairs)
    calls: list[str] = []
    seen_after: list[list[torch.Tensor]] = []

    def pre(optimizer: Any, args: Any, kwargs: Any) -> None:
        assert optimizer is opt
        calls.append("pre")

    def post(optimizer: Any, args: Any, kwargs: Any) -> None:
        calls.append("post")
        seen_after.append(params_of(pairs))

    opt.register_step_pre_hook(pre)
    opt.register_step_post_hook(post)
    for call in range(STEPS):
        train(opt, pairs, range(call, call + 1))
        assert calls == ["pre", "post"] * (call + 1), f"call {call + 1}: hooks ran as {calls}"
        same(seen_after[-1], params_of(pairs), f"call {call + 1}: the post hook saw parameters before the step ended")


@pytest.mark.parametrize("case", rows("state_dict_hooks"))
def test_state_dict_hooks_run_once_per_call(case: OptimizerCase) -> None:
    pairs = make_pairs()
    opt = case.build(pairs)
    train(opt, pairs, range(2))
    counts = dict.fromkeys(("state_dict_pre", "state_dict_post", "load_pre", "load_post"), 0)

    def counter(key: str) -> Callable[..., None]:
        def hook(optimizer: Any, *args: Any) -> None:
            assert optimizer is opt
            counts[key] += 1

        return hook

    opt.register_state_dict_pre_hook(counter("state_dict_pre"))
    opt.register_state_dict_post_hook(counter("state_dict_post"))
    opt.register_load_state_dict_pre_hook(counter("load_pre"))
    opt.register_load_state_dict_post_hook(counter("load_post"))
    saved = opt.state_dict()
    assert counts == {"state_dict_pre": 1, "state_dict_post": 1, "load_pre": 0, "load_post": 0}
    opt.load_state_dict(saved)
    assert counts == {"state_dict_pre": 1, "state_dict_post": 1, "load_pre": 1, "load_post": 1}


# ------------------------------------------------------------------------------ copies, printing, pickling
@pytest.mark.parametrize("case", rows("deepcopy"))
def test_deepcopy_continues_identically(case: OptimizerCase) -> None:
    pairs = make_pairs()
    opt = case.build(pairs)
    train(opt, pairs, range(1))  # mid accumulation, before the first applied step, slow weights not synced
    copied = copy.deepcopy(opt)
    copied_params = [p for group in copied.param_groups for p in group["params"]]
    copied_pairs = [(name, p) for (name, _), p in zip(pairs, copied_params)]
    assert all(p is not q for (_, p), (_, q) in zip(pairs, copied_pairs))
    at_copy = params_of(pairs)
    train(opt, pairs, range(1, STEPS + 1))
    train(copied, copied_pairs, range(1, STEPS + 1))
    assert_moved(params_of(pairs), at_copy)
    same(params_of(copied_pairs), params_of(pairs), "parameters")


@pytest.mark.parametrize("case", rows("pickle"))
def test_the_whole_optimizer_survives_torch_save_and_load(case: OptimizerCase) -> None:
    pairs = make_pairs()
    opt = case.build(pairs)
    train(opt, pairs, range(2))
    buffer = io.BytesIO()
    torch.save({"optimizer": opt}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)["optimizer"]
    assert type(loaded).__name__ == type(opt).__name__
    loaded_params = [p for group in loaded.param_groups for p in group["params"]]
    loaded_pairs = [(name, p) for (name, _), p in zip(pairs, loaded_params)]
    at_save = params_of(pairs)
    train(opt, pairs, range(2, STEPS + 2))
    train(loaded, loaded_pairs, range(2, STEPS + 2))
    assert_moved(params_of(pairs), at_save)
    same(params_of(loaded_pairs), params_of(pairs), "parameters")


@pytest.mark.parametrize("case", rows("repr"))
def test_printing_names_the_class_and_the_groups(case: OptimizerCase) -> None:
    pairs = make_pairs()
    opt = case.build(pairs)
    text = repr(opt)
    assert text.startswith(type(opt).__name__), text[:80]
    assert "Parameter Group 0" in text and "lr:" in text


# ------------------------------------------------------------------------------ zero_grad, groups, no gradients
@pytest.mark.parametrize("case", rows("zero_grad"))
def test_zero_grad_sets_to_none_by_default_and_zeroes_in_place_otherwise(case: OptimizerCase) -> None:
    pairs = make_pairs()
    opt = case.build(pairs)
    train(opt, pairs, range(1))
    opt.zero_grad()
    assert all(p.grad is None for _, p in pairs)
    grads = grads_for(pairs, 1)
    for (_, p), g in zip(pairs, grads):
        p.grad = g
    opt.zero_grad(set_to_none=False)
    for (name, p), g in zip(pairs, grads):
        assert p.grad is g and not g.any(), f"{name}: the gradient was replaced or not zeroed"


@pytest.mark.parametrize("case", rows("add_param_group"))
def test_add_param_group_takes_the_defaults_and_steps_as_a_group_given_at_construction(case: OptimizerCase) -> None:
    pairs = make_pairs()
    opt = case.build(pairs[:-1])
    opt.add_param_group({"params": pairs[-1:]})
    group = opt.param_groups[-1]
    for key, value in opt.defaults.items():
        if key != "params":
            same(group[key], value, f"new group's {key}")
    reference_pairs = make_pairs()
    reference = case.build([{"params": reference_pairs[:-1]}, {"params": reference_pairs[-1:]}])
    train(opt, pairs, range(STEPS))
    train(reference, reference_pairs, range(STEPS))
    same(params_of(pairs), params_of(reference_pairs), "parameters")
    assert not torch.equal(pairs[-1][1], make_pairs()[-1][1]), "the added group did not move"


@pytest.mark.parametrize("case", rows("no_grad_step"))
def test_a_step_without_gradients_changes_no_parameter_and_no_state(case: OptimizerCase) -> None:
    pairs = make_pairs()
    opt = case.build(pairs)
    train(opt, pairs, range(1))  # then Lookahead's slow weights differ from the parameters, and a buffer is not empty
    before, state = params_of(pairs), copy.deepcopy(opt.state_dict()["state"])
    for _, p in pairs:
        p.grad = None
    for call in range(STEPS):
        opt.step()
        same(params_of(pairs), before, f"parameters after {call + 1} calls without gradients")
        same(opt.state_dict()["state"], state, f"state after {call + 1} calls without gradients")


@pytest.mark.parametrize("case", rows("grad_unchanged"))
def test_step_never_writes_into_grad(case: OptimizerCase) -> None:
    pairs = make_pairs()
    opt = case.build(pairs)
    for call in range(STEPS):
        grads = grads_for(pairs, call)
        for (_, p), g in zip(pairs, grads):
            p.grad = g.clone()
        opt.step()
        for (name, p), g in zip(pairs, grads):
            assert p.grad is not None and torch.equal(p.grad, g), f"call {call + 1}: step() changed {name}.grad"


# ------------------------------------------------------------------------------ complex, layouts, tensor lr, foreach
@pytest.mark.parametrize("case", rows("complex"))
def test_complex_parameters_step_as_their_real_pairs(case: OptimizerCase) -> None:
    generator = torch.Generator().manual_seed(0)
    complex_pairs = [(n, torch.nn.Parameter(torch.randn(s, generator=generator, dtype=torch.complex128))) for n, s in SHAPES.items()]
    before = params_of(complex_pairs)
    opt = case.build(complex_pairs)
    grads = [[torch.randn(p.shape, generator=generator, dtype=p.dtype) for _, p in complex_pairs] for _ in range(STEPS)]
    if not case.supports_complex:
        for (_, p), g in zip(complex_pairs, grads[0]):
            p.grad = g
        with pytest.raises(ValueError, match=complex_pairs[0][0]):
            opt.step()
        same(params_of(complex_pairs), before, "parameters after the refused step")
        return
    real_pairs = [(n, torch.nn.Parameter(torch.view_as_real(p.detach()).clone())) for n, p in complex_pairs]
    real = case.build(real_pairs)
    for step_grads in grads:
        for (_, p), (_, q), g in zip(complex_pairs, real_pairs, step_grads):
            p.grad, q.grad = g.clone(), torch.view_as_real(g).clone()
        opt.step()
        real.step()
    initial = [torch.view_as_real(p) for p in before]
    close([torch.view_as_real(p.detach()) for _, p in complex_pairs], params_of(real_pairs), case.tolerance, "complex vs real pairs", initial)


LAYOUT_SHAPES = {"embeddings.weight": (6, 4), "conv.kernel": (5, 4, 2, 3), "dense.bias": (5,), "LayerNorm.gamma": (5,)}


def _layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """``tensor``'s values in ``layout``: channels_last (4-D tensors), or every other element of a buffer."""
    if layout == "channels_last":
        return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor
    strided = torch.empty((*tensor.shape[:-1], 2 * tensor.shape[-1]), dtype=tensor.dtype)[..., ::2]
    return strided.copy_(tensor)


def _layout_run(case: OptimizerCase, layout: str) -> None:
    outcomes = []
    initial = params_of(make_pairs(shapes=LAYOUT_SHAPES))
    for form in ("contiguous", layout):
        pairs = make_pairs(shapes=LAYOUT_SHAPES)
        if form != "contiguous":
            pairs = [(n, torch.nn.Parameter(_layout(p.detach(), layout))) for n, p in pairs]
            assert layout != "non_contiguous" or not any(p.is_contiguous() for _, p in pairs)
        opt = case.build(pairs)
        for call in range(STEPS):
            for (_, p), g in zip(pairs, grads_for(pairs, call)):
                p.grad = _layout(g, layout) if form != "contiguous" else g
            opt.step()
        if form == "channels_last":
            assert pairs[1][1].is_contiguous(memory_format=torch.channels_last), "the parameter lost its memory format"
        outcomes.append(params_of(pairs))
    close(outcomes[1], outcomes[0], case.tolerance, f"{layout} vs contiguous", initial)


@pytest.mark.parametrize("case", rows("channels_last"))
def test_channels_last_parameters_step_as_contiguous_ones(case: OptimizerCase) -> None:
    _layout_run(case, "channels_last")


@pytest.mark.parametrize("case", rows("non_contiguous"))
def test_non_contiguous_parameters_step_as_contiguous_ones(case: OptimizerCase) -> None:
    _layout_run(case, "non_contiguous")


@pytest.mark.parametrize("case", rows("tensor_lr", [c for c in CONTRACT_CASES if c.float_lr]))
def test_a_tensor_lr_equals_the_float_lr(case: OptimizerCase) -> None:
    outcomes = []
    for lr in (case.kwargs["lr"], torch.tensor(case.kwargs["lr"], dtype=torch.float64)):
        pairs = make_pairs()
        opt = case.build(pairs, lr=lr)
        train(opt, pairs, range(STEPS))
        outcomes.append(params_of(pairs))
    close(outcomes[1], outcomes[0], case.tolerance, "tensor lr vs float lr", params_of(make_pairs()))


@pytest.mark.parametrize("case", rows("foreach"))
def test_the_default_step_equals_the_per_tensor_loop(case: OptimizerCase) -> None:
    outcomes = []
    for options in ({}, {"foreach": False}):
        pairs = make_pairs()
        opt = case.build(pairs, **options)
        train(opt, pairs, range(STEPS))
        outcomes.append(params_of(pairs))
    close(outcomes[0], outcomes[1], case.tolerance, "default vs foreach=False", params_of(make_pairs()))


# ------------------------------------------------------------------------------ sparse gradients
SPARSE_CASES = [case for case in CONTRACT_CASES if case.supports_sparse]


def _sparse_initial(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def _sparse_run(case: OptimizerCase, shape: tuple[int, ...], sparse: bool) -> torch.Tensor:
    """Three steps of a loss that reads a few elements of ``w`` through ``torch.gather``, other ones each step."""
    w = torch.nn.Parameter(_sparse_initial(shape))
    opt = case.build([("embeddings.weight", w)])
    for call in range(3):
        if w.dim() == 2:
            index = torch.tensor([[call % 3], [(call + 1) % 3], [(call + 2) % 3]])  # rows 0-2, one column each
        else:
            index = torch.tensor([call, call + 2])
        picked = torch.gather(w, w.dim() - 1, index, sparse_grad=sparse)
        opt.zero_grad()
        (picked * torch.arange(1.0, picked.numel() + 1, dtype=torch.float64).reshape(picked.shape)).sum().backward()
        assert w.grad is not None and w.grad.is_sparse == sparse
        opt.step()
    return w.detach().clone()


@pytest.mark.parametrize("case", rows("sparse_matrix", SPARSE_CASES))
def test_an_element_sparse_gradient_of_a_matrix_acts_as_its_dense_equivalent(case: OptimizerCase) -> None:
    dense = _sparse_run(case, (4, 3), sparse=False)
    close([_sparse_run(case, (4, 3), sparse=True)], [dense], case.tolerance, "sparse vs dense gradient", [_sparse_initial((4, 3))])


@pytest.mark.parametrize("case", rows("sparse_vector", SPARSE_CASES))
def test_a_sparse_gradient_of_a_vector_acts_as_its_dense_equivalent(case: OptimizerCase) -> None:
    dense = _sparse_run(case, (6,), sparse=False)
    close([_sparse_run(case, (6,), sparse=True)], [dense], case.tolerance, "sparse vs dense gradient", [_sparse_initial((6,))])
