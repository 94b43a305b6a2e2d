"""Schedule-Free against the schedulefree package's reference wrapper: training weights, eval weights, lr schedules, resume."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import torch

import danlu
from cases import DERIVATIONS, derive, gradients, named_params
from danlu import _fused, _native
from reference import AdamMath, simulate

schedulefree = pytest.importorskip("schedulefree")

CALLS = 10
SF_KWARGS = dict(schedule_free_momentum=0.8, weight_lr_power=2.0, average_power=0.5)
REF_KWARGS = dict(momentum=0.8, weight_lr_power=2.0, r=0.5)


def warmup(step: int) -> float:
    return min(1.0, (step + 1) / 4)


class Trajectory:
    """Train a Schedule-Free optimizer over ``cases.named_params`` with fixed gradients; record train and eval weights."""

    def __init__(self, opt: Any, params: list[tuple[str, torch.Tensor]], scheduled: bool) -> None:
        self.opt, self.params = opt, params
        base = getattr(opt, "base", opt)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(base, warmup) if scheduled else None

    def run(self, grads: list[list[torch.Tensor]], eval_every: int = 3) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        record = []
        for call, step in enumerate(grads):
            for (_, p), g in zip(self.params, step):
                p.grad = g.clone()
            self.opt.step()
            if self.scheduler is not None:
                self.scheduler.step()
            train = [p.detach().clone() for _, p in self.params]
            evaluated = []
            if call % eval_every == eval_every - 1:
                self.opt.eval()
                evaluated = [p.detach().clone() for _, p in self.params]
                self.opt.train()
            record.append((train, evaluated))
        return record


def reference(make_base: Callable[[list[torch.Tensor]], torch.optim.Optimizer], scheduled: bool) -> list[Any]:
    params = named_params()
    ref = schedulefree.ScheduleFreeWrapperReference(make_base([p for _, p in params]), **REF_KWARGS)
    ref.train()
    return Trajectory(ref, params, scheduled).run(gradients(params, CALLS))


def ours(base: type, base_kwargs: dict[str, Any], scheduled: bool) -> list[Any]:
    params = named_params()
    opt = danlu.extend_with_schedule_free(base)(params, **base_kwargs, **SF_KWARGS)
    return Trajectory(opt, params, scheduled).run(gradients(params, CALLS))


def assert_same(got: list[Any], want: list[Any], tolerance: float) -> None:
    for call, ((train, evaluated), (ref_train, ref_eval)) in enumerate(zip(got, want)):
        assert len(evaluated) == len(ref_eval)
        for a, b in zip(train + evaluated, ref_train + ref_eval):
            if tolerance == 0:
                assert torch.equal(a, b), f"call {call + 1}: {(a - b).abs().max()}"
            else:
                torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant_lr", "LambdaLR"])
def test_equals_the_reference_wrapper_over_torch_sgd_bit_for_bit(scheduled: bool) -> None:
    kwargs = dict(lr=0.05, momentum=0.9)
    want = reference(lambda ps: torch.optim.SGD(ps, **kwargs), scheduled)
    assert_same(ours(torch.optim.SGD, kwargs, scheduled), want, tolerance=0.0)


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant_lr", "LambdaLR"])
def test_equals_the_reference_wrapper_over_danlu_adam_bit_for_bit(scheduled: bool) -> None:
    kwargs = dict(lr=0.02, betas=(0.0, 0.99), eps=1e-8, foreach=True)  # the same Adam kernels on both sides
    want = reference(lambda ps: danlu.Adam(ps, **kwargs), scheduled)
    assert_same(ours(danlu.Adam, kwargs, scheduled), want, tolerance=0.0)


def test_reference_wrapper_breaks_torch_adam_and_danlu_does_not() -> None:
    """The package's wrapper puts z into torch.optim.Adam's state, which then skips its own initialisation."""
    params = named_params()
    ref = schedulefree.ScheduleFreeWrapperReference(torch.optim.Adam([p for _, p in params], lr=0.02))
    ref.train()
    for (_, p), g in zip(params, gradients(params, 1)[0]):
        p.grad = g
    with pytest.raises(KeyError, match="exp_avg"):
        ref.step()
    kwargs = dict(lr=0.02, betas=(0.0, 0.99), eps=1e-8)
    want = reference(lambda ps: danlu.Adam(ps, **kwargs), scheduled=True)
    assert_same(ours(torch.optim.Adam, kwargs, scheduled=True), want, tolerance=1e-12)


def test_two_parameter_sized_tensors_of_state_and_none_in_the_bases_sight() -> None:
    params = named_params()
    seen: list[set[str]] = []

    class Spy(torch.optim.Adam):
        def step(self, closure: Any = None) -> Any:
            seen.extend(set(self.state[p]) for _, p in params)
            return super().step(closure)

    opt = danlu.extend_with_schedule_free(Spy)(params, lr=0.01)
    for _ in range(2):
        for (_, p), g in zip(params, gradients(params, 1)[0]):
            p.grad = g
        opt.step()
    assert all(not (keys & {"schedule_free.z", "schedule_free.x"}) for keys in seen)
    for _, p in params:
        extra = [k for k, v in opt.state[p].items() if k.startswith("schedule_free.")]
        assert sorted(extra) == ["schedule_free.x", "schedule_free.z"]


def test_step_in_eval_mode_is_an_error_and_changes_nothing() -> None:
    params = named_params()
    opt = danlu.extend_with_schedule_free(danlu.Adam)(params, lr=0.01)
    for (_, p), g in zip(params, gradients(params, 1)[0]):
        p.grad = g
    opt.step()
    opt.eval()
    before = [p.detach().clone() for _, p in params]
    with pytest.raises(danlu.derivations.schedule_free.ScheduleFreeModeError, match=r"step\(\) in eval mode.*train\(\)"):
        opt.step()
    with pytest.raises(RuntimeError):
        opt.step()
    assert all(torch.equal(p, b) for (_, p), b in zip(params, before))
    assert opt.param_groups[0]["applied_steps"] == 1


def test_eval_and_train_are_idempotent_and_exact() -> None:
    params = named_params()
    opt = danlu.extend_with_schedule_free(danlu.Adam)(params, lr=0.01)
    for step in gradients(params, 3):
        for (_, p), g in zip(params, step):
            p.grad = g
        opt.step()
    y = [p.detach().clone() for _, p in params]
    opt.eval()
    x = [p.detach().clone() for _, p in params]
    opt.eval()
    assert all(torch.equal(p, a) for (_, p), a in zip(params, x))
    assert all(torch.equal(opt.state[p]["schedule_free.x"], a) for (_, p), a in zip(params, x))
    opt.train()
    opt.train()
    assert all(torch.equal(p, a) for (_, p), a in zip(params, y))


def test_lookahead_over_schedule_free_is_refused_and_inside_it_acts_on_z() -> None:
    params = named_params()
    with pytest.raises(ValueError, match="Lookahead inside Schedule-Free"):
        danlu.extend_with_lookahead(danlu.extend_with_schedule_free(danlu.Adam))
    with pytest.raises(ValueError, match="Lookahead inside Schedule-Free"):
        danlu.create_optimizer(params, "adam+schedule_free+lookahead", lr=0.01)
    inner = danlu.create_optimizer(params, "adam+lookahead+schedule_free", lr=0.01, steps_per_slow_update=2)
    for step in gradients(params, 2):
        for (_, p), g in zip(params, step):
            p.grad = g
        inner.step()
    for _, p in params:  # after the sync, z is the slow weights
        assert torch.equal(inner.state[p]["schedule_free.z"], inner.state[p]["lookahead.slow"])


def test_gradient_accumulation_inside_steps_z_with_the_mean() -> None:
    grads = gradients(named_params(), 6)
    a = named_params()
    accumulated = danlu.create_optimizer(a, "adam+gradient_accumulation+schedule_free", lr=0.01, grad_accum_steps=2)
    b = named_params()
    plain = danlu.create_optimizer(b, "adam+schedule_free", lr=0.01)
    for i, step in enumerate(grads):
        for (_, p), g in zip(a, step):
            p.grad = g.clone()
        accumulated.step()
        if i % 2 == 1:
            for (_, p), g, g0 in zip(b, step, grads[i - 1]):
                p.grad = (g0 + g) / 2
            plain.step()
    for (_, p), (_, q) in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("spec", ["adam+schedule_free+ema", "adam+ema+schedule_free"])
def test_ema_averages_y_outside_and_z_inside(spec: str) -> None:
    params = named_params()
    opt = danlu.create_optimizer(params, spec, lr=0.01, ema_momentum=0.5)
    expected = [torch.zeros_like(p) for _, p in params]
    for step in gradients(params, 3):
        for (_, p), g in zip(params, step):
            p.grad = g
        opt.step()
        for (_, p), shadow in zip(params, expected):
            shadow.lerp_(p.detach() if spec.endswith("ema") else opt.state[p]["schedule_free.z"], 0.5)
    assert all(torch.equal(opt.state[p]["ema.shadow"], e) for (_, p), e in zip(params, expected))
    assert not all(torch.equal(p.detach(), opt.state[p]["schedule_free.z"]) for _, p in params)


@pytest.mark.skipif(not _native.available(), reason="no native kernels on this machine")
def test_native_kernels_step_z_and_an_ema_outside_averages_y() -> None:
    """Every applied step runs the base on the native kernels; the EMA over Schedule-Free runs after it, on y.

    Against the float64 oracle (``tests/reference.py``): decay and the accumulated mean inside act on z,
    the EMA outside averages the y that the parameters hold (fused into the pass it would average z).
    """
    names = ["weight_decay", "gradient_accumulation", "schedule_free", "ema"]
    cls, kwargs = derive(danlu.Adam, names)
    params = named_params()
    initial = {n: p.detach().clone() for n, p in params}
    sequence = gradients(params, 9)
    opt = cls(params, lr=0.02, eps=1e-8, **kwargs)
    assert _fused.spec_for(opt) is not None
    before = _fused.STATS["native_tensors"]
    got = []
    for step in sequence:
        for (_, p), g in zip(params, step):
            p.grad = g.clone()
        opt.step()
        got.append({n: p.detach().clone() for n, p in params})
    steps = len(sequence) // DERIVATIONS["gradient_accumulation"].kwargs["grad_accum_steps"]
    assert _fused.STATS["native_tensors"] - before == steps * len(params)
    by_name = [{n: g for (n, _), g in zip(params, step)} for step in sequence]
    want, ema, applied = simulate(AdamMath(0.02), [(n, dict(DERIVATIONS[n].kwargs)) for n in names], initial, by_name)
    assert applied == steps and ema is not None
    for call, (g_step, w_step) in enumerate(zip(got, want)):
        for n in w_step:
            torch.testing.assert_close(g_step[n], w_step[n], rtol=1e-10, atol=1e-10, msg=lambda m: f"call {call + 1}, {n}: {m}")
    for n, p in params:
        torch.testing.assert_close(opt.state[p]["ema.shadow"], ema[n], rtol=1e-10, atol=1e-10)
        assert not torch.allclose(opt.state[p]["schedule_free.z"], p.detach(), rtol=1e-6, atol=0)


@pytest.mark.skipif(not _native.available(), reason="no native kernels on this machine")
@pytest.mark.parametrize("spec", ["adam+schedule_free+ema", "adam+ema+schedule_free", "adam+lookahead+schedule_free+ema"])
def test_every_tensor_takes_the_native_pass(spec: str) -> None:
    params = named_params(torch.float32)
    opt = danlu.create_optimizer(params, spec, lr=0.01, **(dict(steps_per_slow_update=2) if "lookahead" in spec else {}))
    before = _fused.STATS["native_tensors"]
    for step in gradients(params, 4):
        for (_, p), g in zip(params, step):
            p.grad = g
        opt.step()
    assert _fused.STATS["native_tensors"] - before == 4 * len(params)


# ------------------------------------------------------------------ resume
RESUME_SPECS = {
    "adam+schedule_free": dict(lr=0.02),
    "torch.AdamW+gradient_accumulation+schedule_free": dict(lr=0.02, grad_accum_steps=3),
    "adamw+lookahead+schedule_free+ema": dict(lr=0.02, steps_per_slow_update=2, ema_momentum=0.5),
}


def train_calls(opt: Any, params: list[tuple[str, torch.Tensor]], grads: list[list[torch.Tensor]], switch_at: set[int]) -> None:
    for call, step in enumerate(grads):
        for (_, p), g in zip(params, step):
            p.grad = g.clone()
        opt.step()
        if call in switch_at:
            opt.eval()
            opt.train()


@pytest.mark.parametrize("spec", list(RESUME_SPECS))
@pytest.mark.parametrize("stop", [1, 2, 4, 5])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_resume_is_bit_identical(spec: str, stop: int, mode: str) -> None:
    """Stopped mid-cycle, in train mode or saved in eval mode, after an eval/train switch: the same bits."""
    kwargs = RESUME_SPECS[spec]
    grads = gradients(named_params(), 8)
    params = named_params()
    opt = danlu.create_optimizer(params, spec, **kwargs)
    train_calls(opt, params, grads, switch_at={1, 3})
    opt.eval()
    expected = [p.detach().clone() for _, p in params]

    params = named_params()
    opt = danlu.create_optimizer(params, spec, **kwargs)
    train_calls(opt, params, grads[:stop], switch_at={1, 3})
    if mode == "eval":
        opt.eval()
    buffer = io.BytesIO()
    torch.save({"model": [p.detach().clone() for _, p in params], "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    fresh = named_params(seed=7)
    with torch.no_grad():
        for (_, p), saved in zip(fresh, checkpoint["model"]):
            p.copy_(saved)
    resumed = danlu.create_optimizer(fresh, spec, **kwargs)
    resumed.load_state_dict(checkpoint["opt"])
    assert bool(resumed.param_groups[0]["schedule_free_eval"]) == (mode == "eval")
    if mode == "eval":
        resumed.train()
    train_calls(resumed, fresh, grads[stop:], switch_at={c - stop for c in (1, 3) if c >= stop})
    resumed.eval()
    for (_, p), e in zip(fresh, expected):
        assert torch.equal(p, e)


def test_validation_names_the_argument() -> None:
    cls = danlu.extend_with_schedule_free(danlu.Adam)
    for kwargs, error, name in [
        (dict(schedule_free_momentum=1.0), ValueError, "schedule_free_momentum"),
        (dict(schedule_free_momentum=-0.1), ValueError, "schedule_free_momentum"),
        (dict(weight_lr_power=-1.0), ValueError, "weight_lr_power"),
        (dict(weight_lr_power=float("inf")), ValueError, "weight_lr_power"),
        (dict(average_power="1"), TypeError, "average_power"),
    ]:
        with pytest.raises(error, match=f"Invalid {name}"):
            cls(named_params(), lr=0.01, **kwargs)


def test_parameters_without_gradients_get_no_state() -> None:
    params = named_params()
    opt = danlu.extend_with_schedule_free(danlu.Adam)(params, lr=0.01)
    frozen = params[0][1]
    before = frozen.detach().clone()
    for (_, p), g in zip(params, gradients(params, 1)[0]):
        p.grad = None if p is frozen else g
    opt.step()
    assert frozen not in opt.state and torch.equal(frozen, before)
    opt.eval()
    opt.train()
    assert torch.equal(frozen, before)
