"""Plain training loops with torch.compile: of the model, and of the optimizer step.

CI compiles with the ``aot_eager`` backend (Dynamo tracing, graph breaks and AOTAutograd are
exercised; no C++ code generation, which takes minutes on two cores). Set
``DANLU_TEST_INDUCTOR=1`` to compile with the default inductor backend.
"""

from __future__ import annotations

import os

import pytest
import torch

import danlu

BACKEND = "inductor" if os.environ.get("DANLU_TEST_INDUCTOR") else "aot_eager"
STEP_BACKEND = "inductor" if os.environ.get("DANLU_TEST_INDUCTOR") else "eager"


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), torch.nn.GELU(), torch.nn.Linear(12, 1))


def _batches(n=6):
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)) for _ in range(n)]


def _train(model, forward, opt, step):
    for x, y in _batches():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(forward(x), y).backward()
        step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


SPECS = [
    "adamw+ema",
    "lamb+lookahead",
    "torch.AdamW+weight_decay+ema",
    "lion+piecewise_linear_lr",
    "torch.AdamW+gradient_accumulation",
    "adamw+gradient_accumulation+lookahead",
]


@pytest.mark.parametrize("spec", SPECS)
def test_compiled_model_and_compiled_step_match_eager(spec):
    hyper = {"lr": 1e-2}
    if "piecewise" in spec:
        hyper["lr_schedule"] = {2: 1.0}
    eager_model = _model()
    eager_opt = danlu.create_optimizer(eager_model, spec, **hyper)
    expected = _train(eager_model, eager_model, eager_opt, eager_opt.step)

    model = _model()
    opt = danlu.create_optimizer(model, spec, **hyper)  # build from the model, not the compiled wrapper
    compiled = torch.compile(model, backend=BACKEND)

    @torch.compile(backend=STEP_BACKEND)
    def step():
        opt.step()

    got = _train(model, compiled, opt, step)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    assert opt.param_groups[0]["applied_steps"] == eager_opt.param_groups[0]["applied_steps"]


def test_optimizer_from_compiled_module_keeps_the_bert_grouping():
    """A compiled module's parameter names start with ``_orig_mod.``; the no-decay grouping still finds norms and biases."""
    compiled = torch.compile(_model(), backend=BACKEND)
    opt = danlu.create_optimizer(compiled, "adamw", lr=1e-3, weight_decay_rate=0.1)
    no_decay = [n for g in opt.param_groups if g["weight_decay_rate"] == 0 for n in g["param_names"]]
    assert no_decay == ["_orig_mod.0.bias", "_orig_mod.1.weight", "_orig_mod.1.bias", "_orig_mod.3.bias"]


def test_compiled_step_with_changing_lr_from_a_scheduler():
    model = _model()
    opt = danlu.create_optimizer(model, "adamw", lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    reference = _model()
    ref_opt = danlu.create_optimizer(reference, "adamw", lr=1e-2)
    ref_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=6)

    @torch.compile(backend=STEP_BACKEND)
    def step():
        opt.step()

    def compiled_step():
        step()
        sched.step()

    def eager_step():
        ref_opt.step()
        ref_sched.step()

    got = _train(model, model, opt, compiled_step)
    expected = _train(reference, reference, ref_opt, eager_step)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
