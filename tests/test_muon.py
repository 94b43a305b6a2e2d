"""Muon against torch.optim.Muon, against a float64 Newton-Schulz written here, and its Adam part against torch.optim.Adam."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch

import danlu
from danlu import _fused, _native
from danlu.optimizers import muon
from danlu.optimizers.muon import newton_schulz

COEFFICIENTS = (3.4445, -4.775, 2.0315)
MATRICES = {"a.weight": (6, 4), "b.weight": (4, 6), "c.weight": (6, 4), "conv.weight": (5, 3, 2), "d.weight": (4, 4)}


def matrices(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype))) for n, s in MATRICES.items()]


def grad_sequence(named: list[tuple[str, torch.Tensor]], steps: int, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype) for _, p in named] for _ in range(steps)]


def ns64(m: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The quintic Newton-Schulz iteration, written out in float64."""
    a, b, c = COEFFICIENTS
    x = m.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / max(float(torch.linalg.matrix_norm(x)), eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def muon64(
    named: list[tuple[str, torch.Tensor]],
    grads: list[list[torch.Tensor]],
    lr: float,
    momentum: float,
    nesterov: bool,
    adjust: str | None = None,
    decay: float = 0.0,
) -> list[torch.Tensor]:
    """Muon restated in float64: momentum, NS of the flattened update, adjusted lr, decoupled decay."""
    params = [p.detach().double().clone() for _, p in named]
    bufs = [torch.zeros_like(p) for p in params]
    for step in grads:
        for i, g in enumerate(step):
            g = g.double()
            bufs[i] = momentum * bufs[i] + (1 - momentum) * g
            u = (1 - momentum) * g + momentum * bufs[i] if nesterov else bufs[i]
            rows, cols = params[i].shape[0], math.prod(params[i].shape[1:])
            o = ns64(u.reshape(rows, cols)).reshape(params[i].shape)
            ratio = 0.2 * math.sqrt(max(rows, cols)) if adjust == "match_rms_adamw" else math.sqrt(max(1, rows / cols))
            params[i] = params[i] - lr * ratio * o - lr * decay * params[i]
    return params


def run(opt: torch.optim.Optimizer, named: list[tuple[str, torch.Tensor]], grads: list[list[torch.Tensor]]) -> None:
    for step in grads:
        for (_, p), g in zip(named, step):
            p.grad = g.clone()
        opt.step()


# ------------------------------------------------------------------ against torch.optim.Muon
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", [None, "original", "match_rms_adamw"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64])
def test_reference_loop_equals_torch_muon_in_bfloat16(nesterov: bool, adjust: str | None, param_dtype: torch.dtype) -> None:
    """foreach=False takes torch's very Newton-Schulz operations: the same bf16 products, one rounding of the write apart."""
    named = [(n, p) for n, p in matrices(param_dtype) if p.dim() == 2]
    theirs = [torch.nn.Parameter(p.detach().clone()) for _, p in named]
    grads = grad_sequence(named, 6)
    ours = danlu.Muon(named, lr=0.02, nesterov=nesterov, adjust_lr_fn=adjust, foreach=False)
    ref = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.0, nesterov=nesterov, adjust_lr_fn=adjust)
    for step in grads:
        for (_, p), q, g in zip(named, theirs, step):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for (_, p), q in zip(named, theirs):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=4 * torch.finfo(param_dtype).eps)
            torch.testing.assert_close(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], rtol=0, atol=0)


def test_batched_default_equals_torch_muon_to_bfloat16_accuracy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The batched bmm chain rounds its bf16 products in another order than torch's mm: the same to bf16 accuracy."""
    monkeypatch.setattr(danlu.optimizers.muon, "BATCH_ON_CPU", True)
    named = [(n, p) for n, p in matrices() if p.dim() == 2]
    theirs = [torch.nn.Parameter(p.detach().clone()) for _, p in named]
    start = [p.detach().clone() for _, p in named]
    grads = grad_sequence(named, 3)
    run(danlu.Muon(named, lr=0.02), named, grads)
    run(torch.optim.Muon(theirs, lr=0.02, weight_decay=0.0), list(zip(MATRICES, theirs)), grads)
    for (_, p), q, p0 in zip(named, theirs, start):
        moved = (q.detach() - p0).abs().max()
        assert (p.detach() - q.detach()).abs().max() <= 2 * 2**-8 * moved  # a bf16 ulp or two of the step


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_float64_newton_schulz_equals_the_restated_algorithm(
    foreach: bool | None, nesterov: bool, adjust: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ns_dtype=float64 on float64 parameters: matrices, a flattened 3-D tensor, both orientations, to 1e-12."""
    monkeypatch.setattr(danlu.optimizers.muon, "BATCH_ON_CPU", True)
    named = matrices(torch.float64)
    grads = grad_sequence(named, 5)
    expected = muon64(named, grads, lr=0.03, momentum=0.9, nesterov=nesterov, adjust=adjust)
    opt = danlu.Muon(
        named, lr=0.03, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust, ns_dtype=torch.float64, foreach=foreach
    )
    run(opt, named, grads)
    for (_, p), e in zip(named, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_float32_newton_schulz_is_within_float32_of_float64() -> None:
    named = matrices(torch.float32)
    grads = grad_sequence(named, 5)
    expected = muon64(named, grads, lr=0.03, momentum=0.95, nesterov=True)
    run(danlu.Muon(named, lr=0.03, ns_dtype=torch.float32), named, grads)
    for (_, p), e in zip(named, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=0, atol=2e-6)


@pytest.mark.parametrize("batch_on_cpu", [True, False])
def test_batched_and_reference_loop_agree_in_float64(batch_on_cpu: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(danlu.optimizers.muon, "BATCH_ON_CPU", batch_on_cpu)
    a, b = matrices(torch.float64), matrices(torch.float64)
    grads = grad_sequence(a, 4)
    run(danlu.Muon(a, lr=0.02, ns_dtype=torch.float64), a, grads)
    run(danlu.Muon(b, lr=0.02, ns_dtype=torch.float64, foreach=False), b, grads)
    for (_, p), (_, q) in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-13)


def test_newton_schulz_batch_equals_one_by_one() -> None:
    g = torch.Generator().manual_seed(3)
    batch = torch.randn(4, 5, 7, generator=g, dtype=torch.float64)
    together = newton_schulz(batch, COEFFICIENTS, 5, 1e-7, torch.float64)
    for i in range(4):
        torch.testing.assert_close(together[i], ns64(batch[i]), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(
            newton_schulz(batch[i], COEFFICIENTS, 5, 1e-7, torch.float64), ns64(batch[i]), rtol=1e-13, atol=1e-13
        )
    tall = newton_schulz(batch.mT, COEFFICIENTS, 5, 1e-7, torch.float64)
    torch.testing.assert_close(tall, together.mT, rtol=1e-13, atol=1e-13)


def test_newton_schulz_never_writes_its_input() -> None:
    m = torch.randn(4, 6, dtype=torch.float64)
    before = m.clone()
    newton_schulz(m, COEFFICIENTS, 5, 1e-7, torch.float64)
    newton_schulz(m.unsqueeze(0), COEFFICIENTS, 5, 1e-7, torch.float64)
    assert torch.equal(m, before)


# ------------------------------------------------------------------ weight decay
@pytest.mark.parametrize("foreach", [None, False])
def test_weight_decay_is_torch_muons_decoupled_decay(foreach: bool | None) -> None:
    named = [(n, p) for n, p in matrices(torch.float64) if p.dim() == 2]
    grads = grad_sequence(named, 5)
    expected = muon64(named, grads, lr=0.05, momentum=0.95, nesterov=True, adjust="match_rms_adamw", decay=0.1)
    opt = danlu.extend_with_weight_decay(danlu.Muon)(
        named, lr=0.05, weight_decay_rate=0.1, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.float64, foreach=foreach
    )
    run(opt, named, grads)
    for (_, p), e in zip(named, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_weight_decay_matches_torch_muon_with_its_weight_decay() -> None:
    named = [(n, p) for n, p in matrices() if p.dim() == 2]
    theirs = [torch.nn.Parameter(p.detach().clone()) for _, p in named]
    grads = grad_sequence(named, 4)
    run(danlu.extend_with_weight_decay(danlu.Muon)(named, lr=0.05, weight_decay_rate=0.1, foreach=False), named, grads)
    run(torch.optim.Muon(theirs, lr=0.05, weight_decay=0.1), list(zip(MATRICES, theirs)), grads)
    for (_, p), q in zip(named, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ the Adam part
def hybrid_model() -> list[tuple[str, torch.nn.Parameter]]:
    g = torch.Generator().manual_seed(5)
    shapes = {
        "emb.weight": (7, 4),
        "hidden.weight": (4, 4),
        "hidden.bias": (4,),
        "norm.weight": (4,),
        "scale": (),
        "head.weight": (3, 4),
    }
    return [(n, torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64))) for n, s in shapes.items()]


@pytest.mark.parametrize("foreach", [None, False])
def test_vectors_scalars_and_excluded_names_take_torch_adam(foreach: bool | None) -> None:
    named = hybrid_model()
    grads = grad_sequence(named, 6)
    opt = danlu.Muon(
        named,
        lr=0.01,
        adam_betas=(0.8, 0.9),
        adam_eps=1e-6,
        exclude_from_muon=["emb", r"^head\."],
        ns_dtype=torch.float64,
        foreach=foreach,
    )
    adam_names = ["emb.weight", "hidden.bias", "norm.weight", "scale", "head.weight"]
    theirs = {n: torch.nn.Parameter(p.detach().clone()) for n, p in named if n in adam_names}
    ref = torch.optim.Adam(list(theirs.values()), lr=0.01, betas=(0.8, 0.9), eps=1e-6)
    hidden = [(n, p) for n, p in named if n == "hidden.weight"]
    expected_hidden = muon64(hidden, [[s[1]] for s in grads], lr=0.01, momentum=0.95, nesterov=True)
    for step in grads:
        for (n, p), g in zip(named, step):
            p.grad = g.clone()
            if n in theirs:
                theirs[n].grad = g.clone()
        opt.step()
        ref.step()
    params = dict(named)
    for n, q in theirs.items():
        torch.testing.assert_close(params[n].detach(), q.detach(), rtol=1e-14, atol=1e-14)
        assert sorted(opt.state[params[n]]) == ["exp_avg", "exp_avg_sq", "step"]
    torch.testing.assert_close(params["hidden.weight"].detach(), expected_hidden[0], rtol=1e-12, atol=1e-12)
    assert sorted(opt.state[params["hidden.weight"]]) == ["momentum_buffer", "step"]


def test_adam_part_has_its_own_lr_through_a_param_group() -> None:
    named = hybrid_model()
    matrices_ = [(n, p) for n, p in named if p.dim() == 2]
    rest = [(n, p) for n, p in named if p.dim() < 2]
    opt = danlu.Muon([{"params": matrices_}, {"params": rest, "lr": 0.0}], lr=0.01)
    before = [p.detach().clone() for _, p in rest]
    run(opt, named, grad_sequence(named, 2))
    assert all(torch.equal(p, b) for (_, p), b in zip(rest, before))


# ------------------------------------------------------------------ bad input
def test_exclude_from_muon_without_names_is_an_error() -> None:
    with pytest.raises(ValueError, match="exclude_from_muon matches parameter names.*without names"):
        danlu.Muon([p for _, p in hybrid_model()], exclude_from_muon=["emb"])


def test_complex_parameter_is_refused_by_name_before_anything_changes() -> None:
    w = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    v = torch.nn.Parameter(torch.ones(3, 3))
    opt = danlu.Muon([("real", v), ("waves", w)], lr=0.1)
    v.grad, w.grad = torch.ones(3, 3), torch.ones(3, 3, dtype=torch.complex64)
    with pytest.raises(ValueError, match="Muon does not support complex.*'waves'"):
        opt.step()
    assert torch.equal(v, torch.ones(3, 3)) and not opt.state


def test_sparse_gradient_is_refused_by_name() -> None:
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = danlu.Muon(emb.named_parameters(), lr=0.1)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(ValueError, match="does not support sparse gradients.*'weight'"):
        opt.step()


# ------------------------------------------------------------------ state, fast path, precision
@pytest.mark.skipif(not _native.available(), reason="no native kernels on this machine")
def test_native_kernels_take_the_adam_part_and_only_it() -> None:
    named = hybrid_model()
    grads = grad_sequence(named, 3)
    opt = danlu.Muon(named, lr=0.01, exclude_from_muon=["emb", r"^head\."], ns_dtype=torch.float64)
    seen: list[int] = []
    original = muon.newton_schulz

    def counting(update: torch.Tensor, *args: Any) -> torch.Tensor:
        seen.append(update.numel())
        return original(update, *args)

    before = _fused.STATS["native_tensors"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(muon, "newton_schulz", counting)
        run(opt, named, grads)
    assert _fused.STATS["native_tensors"] - before == 5 * 3  # emb, hidden.bias, norm, scale, head: every step
    assert seen == [16] * 3  # hidden.weight alone takes Newton-Schulz


def test_without_the_native_library_the_adam_part_takes_the_generic_path() -> None:
    named, reference = hybrid_model(), hybrid_model()
    grads = grad_sequence(named, 4)
    kwargs: dict[str, Any] = dict(lr=0.01, exclude_from_muon=["emb"], ns_dtype=torch.float64)
    before = dict(_fused.STATS)
    _native.disable()
    try:
        run(danlu.Muon(named, **kwargs), named, grads)
    finally:
        _native.enable()
    assert dict(_fused.STATS) == before  # neither the native kernels nor torch's fused Adam (its options are not Adam's)
    run(danlu.Muon(reference, foreach=False, **kwargs), reference, grads)
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(named, reference))


def test_state_dict_round_trip_keeps_the_roles_of_named_matrices() -> None:
    named = hybrid_model()
    grads = grad_sequence(named, 4)
    kwargs: dict[str, Any] = dict(lr=0.01, exclude_from_muon=["emb", "head"])
    opt = danlu.Muon(named, **kwargs)
    run(opt, named, grads[:2])
    buffer = io.BytesIO()
    torch.save({"model": {n: p.detach().clone() for n, p in named}, "opt": opt.state_dict()}, buffer)
    run(opt, named, grads[2:])
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    fresh = [(n, torch.nn.Parameter(checkpoint["model"][n])) for n, _ in named]
    resumed = danlu.Muon(fresh, **kwargs)
    resumed.load_state_dict(checkpoint["opt"])
    run(resumed, fresh, grads[2:])
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(named, fresh))


def test_loading_takes_the_saved_roles_and_refuses_state_of_another_role() -> None:
    named = hybrid_model()
    opt = danlu.Muon(named, lr=0.01)
    run(opt, named, grad_sequence(named, 1))
    saved = opt.state_dict()
    other = danlu.Muon(hybrid_model(), lr=0.01, exclude_from_muon=["emb"])
    other.load_state_dict(saved)  # like every group option, the saved exclude_from_muon replaces this one
    assert other.param_groups[0]["exclude_from_muon"] == ()
    emb_index = [n for n, _ in named].index("emb.weight")
    tampered = {**saved, "state": dict(saved["state"])}
    tampered["param_groups"] = [{**saved["param_groups"][0], "exclude_from_muon": ("emb",)}]
    with pytest.raises(ValueError, match="'emb.weight' lacks \\['exp_avg', 'exp_avg_sq'\\]"):
        danlu.Muon(hybrid_model(), lr=0.01).load_state_dict(tampered)
    assert emb_index in saved["state"]


def test_bfloat16_parameters_keep_float32_state() -> None:
    named = [(n, torch.nn.Parameter(p.detach().to(torch.bfloat16))) for n, p in hybrid_model()]
    opt = danlu.Muon(named, lr=0.01, exclude_from_muon=["emb"])
    run(opt, named, grad_sequence(named, 2))
    dtypes = {k: v.dtype for _, p in named for k, v in opt.state[p].items() if k != "step"}
    assert set(dtypes.values()) == {torch.float32}
    assert all(p.dtype == torch.bfloat16 and bool(torch.isfinite(p).all()) for _, p in named)


# ------------------------------------------------------------------ create_optimizer
class TinyLM(torch.nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(11, 4)
        self.block = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 4))
        self.decoder = torch.nn.Linear(4, 11)
        if tied:
            self.decoder.weight = self.tok.weight
        self.classifier = torch.nn.Linear(4, 2)


@pytest.mark.parametrize("tied", [True, False])
def test_create_optimizer_sends_embeddings_and_output_layers_to_adam(tied: bool) -> None:
    model = TinyLM(tied)
    opt = danlu.create_optimizer(model, "muon", lr=0.02)
    x = torch.tensor([[1, 2, 3]])
    (model.classifier(model.block(model.tok(x))).sum() + model.decoder(model.tok(x)).sum()).backward()
    opt.step()
    roles = {n: "adam" if "exp_avg" in opt.state[p] else "muon" for n, p in model.named_parameters()}
    adam_matrices = {n for n, r in roles.items() if r == "adam" and dict(model.named_parameters())[n].dim() == 2}
    assert adam_matrices == {"tok.weight", "classifier.weight"}  # tied: the decoder's weight is tok.weight
    assert roles["block.0.weight"] == roles["block.2.weight"] == "muon"
    if not tied:
        assert roles["decoder.weight"] == "muon"  # an untied Linear named neither head nor classifier


def test_create_optimizer_respects_a_given_exclude_from_muon() -> None:
    model = TinyLM(tied=False)
    opt = danlu.create_optimizer(model, "muon+weight_decay", lr=0.02, exclude_from_muon=())
    assert opt.param_groups[0]["exclude_from_muon"] == ()
    named = [("embeddings.word.weight", model.tok.weight), *[(n, p) for n, p in model.named_parameters() if n != "tok.weight"]]
    opt = danlu.create_optimizer(named, "muon", lr=0.02)  # bare pairs: judged by their names
    assert set(opt.param_groups[0]["exclude_from_muon"]) == {r"^embeddings\.word\.weight$", r"^classifier\.weight$"}


# ------------------------------------------------------------------ derivations compose
def trajectory(
    opt: torch.optim.Optimizer, named: list[tuple[str, torch.Tensor]], grads: list[list[torch.Tensor]]
) -> list[torch.Tensor]:
    run(opt, named, grads)
    return [p.detach().clone() for _, p in named]


EXACT: dict[str, Any] = dict(ns_dtype=torch.float64, exclude_from_muon=["emb"])


def test_accumulation_steps_muon_with_the_mean_gradient() -> None:
    grads = grad_sequence(hybrid_model(), 6)
    accumulated = hybrid_model()
    got = trajectory(
        danlu.create_optimizer(accumulated, "muon+gradient_accumulation", lr=0.02, grad_accum_steps=3, **EXACT),
        accumulated,
        grads,
    )
    means = [[sum(step[i] for step in grads[k : k + 3]) / 3 for i in range(len(grads[0]))] for k in (0, 3)]
    plain = hybrid_model()
    want = trajectory(danlu.Muon(plain, lr=0.02, **EXACT), plain, means)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("batch_on_cpu", [False, True])
def test_accumulated_mean_reaches_newton_schulz_when_batched(batch_on_cpu: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole-group pass reads the matrices' gradients itself: their mean is formed before it, never left to a kernel."""
    monkeypatch.setattr(muon, "BATCH_ON_CPU", batch_on_cpu)
    grads = grad_sequence(hybrid_model(), 4)
    accumulated = hybrid_model()
    got = trajectory(
        danlu.create_optimizer(accumulated, "muon+gradient_accumulation", lr=0.02, grad_accum_steps=2, **EXACT),
        accumulated,
        grads,
    )
    means = [[(a + b) / 2 for a, b in zip(grads[k], grads[k + 1])] for k in (0, 2)]
    plain = hybrid_model()
    want = trajectory(danlu.Muon(plain, lr=0.02, foreach=False, **EXACT), plain, means)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)


def test_piecewise_and_parameter_wise_lr_scale_the_muon_and_adam_updates() -> None:
    grads = grad_sequence(hybrid_model(), 4)
    scaled = hybrid_model()
    spec = "muon+piecewise_linear_lr+paramwise_lr"
    kwargs = dict(lr=0.02, lr_schedule={0: 0.5}, paramwise_lr_schedule={"hidden": 0.3}, **EXACT)
    got = trajectory(danlu.create_optimizer(scaled, spec, **kwargs), scaled, grads)
    plain = hybrid_model()
    groups = [
        {"params": [(n, p) for n, p in plain if n.startswith("hidden")], "lr": 0.02 * 0.5 * 0.3},
        {"params": [(n, p) for n, p in plain if not n.startswith("hidden")], "lr": 0.02 * 0.5},
    ]
    opt = danlu.Muon(groups, **EXACT)
    run(opt, plain, grads)
    for (n, _), a in zip(scaled, got):
        torch.testing.assert_close(a, dict(plain)[n].detach(), rtol=1e-13, atol=1e-13)


def test_skip_nonfinite_drops_the_call() -> None:
    grads = grad_sequence(hybrid_model(), 4)
    bad = [g.clone() for g in grads[1]]
    bad[1][0, 0] = math.nan
    skipping = hybrid_model()
    got = trajectory(
        danlu.create_optimizer(skipping, "muon+skip_nonfinite", lr=0.02, **EXACT), skipping, [grads[0], bad, *grads[2:]]
    )
    plain = hybrid_model()
    want = trajectory(danlu.Muon(plain, lr=0.02, **EXACT), plain, [grads[0], *grads[2:]])
    assert all(torch.equal(a, b) for a, b in zip(got, want))
