"""danlu.grouping: timm-style decay / no-decay groups and layer-wise lr decay inside the optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

import danlu
from danlu.grouping import (
    auto_layer_id,
    build_optimizer,
    extend_with_lr_scale,
    layer_ids,
    no_decay_parameter_names,
    param_groups,
)


class TinyBert(nn.Module):
    def __init__(self, layers=3, hidden=4):
        super().__init__()
        self.embeddings = nn.ModuleDict({"word_embeddings": nn.Embedding(11, hidden), "LayerNorm": nn.LayerNorm(hidden)})
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            nn.ModuleDict({"dense": nn.Linear(hidden, hidden), "LayerNorm": nn.LayerNorm(hidden)}) for _ in range(layers)
        )
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, 2)

    def forward(self, ids):
        x = self.embeddings["LayerNorm"](self.embeddings["word_embeddings"](ids))
        for block in self.encoder.layer:
            x = block["LayerNorm"](x + torch.tanh(block["dense"](x)))
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


def _names(group):
    return [n for n, _ in group["params"]]


def test_no_decay_for_bias_and_norm_by_module_type():
    model = TinyBert()
    names = no_decay_parameter_names(model, one_dimensional=False)
    expected = {n for n, _ in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n}
    assert names == expected


def test_no_decay_custom_norm_class_by_name_and_timm_no_weight_decay():
    class MyRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(2, 2))  # 2-D on purpose: found by module type, not by ndim

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = MyRMSNorm()
            self.pos_embed = nn.Parameter(torch.zeros(3, 2))
            self.proj = nn.Linear(2, 2, bias=False)

        def no_weight_decay(self):
            return {"pos_embed"}

    assert no_decay_parameter_names(Model()) == {"norm.scale", "pos_embed"}
    assert no_decay_parameter_names(Model(), patterns=[r"^proj\."]) == {"norm.scale", "pos_embed", "proj.weight"}


def test_named_pairs_input_uses_names_and_ndim():
    pairs = [("a.kernel", torch.zeros(2, 2)), ("a.bias", torch.zeros(2)), ("ln.gamma", torch.zeros(2))]
    assert no_decay_parameter_names(pairs) == {"a.bias", "ln.gamma"}
    groups = param_groups(pairs, weight_decay_rate=0.1)
    assert [(_names(g), g["weight_decay_rate"]) for g in groups] == [(["a.kernel"], 0.1), (["a.bias", "ln.gamma"], 0.0)]


def test_layer_decay_scales_bert():
    model = TinyBert(layers=3)
    groups = param_groups(model, weight_decay_rate=0.01, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in _names(g)}
    decay = {n: g["weight_decay_rate"] for g in groups for n in _names(g)}
    # embeddings 0, layer i -> i + 1, pooler/classifier -> top = 4
    assert scale["embeddings.word_embeddings.weight"] == 0.5**4
    assert scale["encoder.layer.0.dense.weight"] == 0.5**3
    assert scale["encoder.layer.2.LayerNorm.bias"] == 0.5
    assert scale["pooler.weight"] == scale["classifier.bias"] == 1.0
    assert decay["encoder.layer.1.dense.weight"] == 0.01 and decay["encoder.layer.1.dense.bias"] == 0.0
    # every parameter exactly once, groups ordered by layer
    all_names = [n for g in groups for n in _names(g)]
    assert sorted(all_names) == sorted(n for n, _ in model.named_parameters())
    assert [g["lr_scale"] for g in groups] == sorted(g["lr_scale"] for g in groups)


def test_layer_ids_by_modules_dict_and_callable():
    model = TinyBert(layers=2)
    by_module, top = layer_ids(model, [model.embeddings, *model.encoder.layer])
    assert top == 3 and by_module["encoder.layer.1.dense.weight"] == 2 and by_module["pooler.bias"] == 3
    by_regex, top = layer_ids(model, {r"embeddings": 0, r"layer\.0\.": 1, r"layer\.1\.": 2})
    assert by_regex == by_module
    by_callable, _ = layer_ids(model, auto_layer_id)
    assert by_callable == by_module
    with pytest.raises(ValueError, match="layer_id"):
        layer_ids(model, lambda name: -1)
    with pytest.raises(TypeError, match="layer_id"):
        layer_ids(model, 3)


def test_auto_layer_id_names():
    assert auto_layer_id("model.layers.0.self_attn.q_proj.weight") == 1  # llama
    assert auto_layer_id("blocks.11.mlp.fc1.weight") == 12  # timm vit
    assert auto_layer_id("transformer.wte.weight") == 0
    assert auto_layer_id("cls_token") == 0
    assert auto_layer_id("head.weight") is None
    assert auto_layer_id("model.norm.weight") is None


def test_bad_arguments():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="layer_decay"):
        param_groups(model, layer_decay=0.0)
    with pytest.raises(ValueError, match="weight_decay_rate"):
        param_groups(model, weight_decay_rate=-1.0)
    with pytest.raises(TypeError, match="model"):
        param_groups(torch.zeros(2))
    with pytest.raises(ValueError, match="patterns"):
        param_groups(model, no_decay=["("])
    with pytest.raises(ValueError, match="lr_scale"):
        extend_with_lr_scale(danlu.SGD)([{"params": model.parameters(), "lr_scale": -1.0}], lr=1.0)


@pytest.mark.parametrize("base", [danlu.AdamW, danlu.Lamb], ids=["AdamW", "Lamb"])
def test_lr_scale_equals_a_scaled_lr_danlu(base):
    """A group with lr_scale s steps exactly like the same optimizer with lr * s (decay and trust ratio included)."""
    torch.manual_seed(0)
    w1 = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    w2 = nn.Parameter(w1.detach().clone())
    scaled = extend_with_lr_scale(base)([{"params": [("w", w1)], "lr_scale": 0.25}], lr=1e-2, weight_decay_rate=0.1)
    plain = base([("w", w2)], lr=1e-2 * 0.25, weight_decay_rate=0.1)
    for t in range(5):
        g = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        w1.grad, w2.grad = g.clone(), g.clone()
        scaled.step()
        plain.step()
    torch.testing.assert_close(w1, w2, rtol=1e-14, atol=0)


def test_lr_scale_on_torch_adamw_equals_per_group_lr():
    torch.manual_seed(0)
    model = TinyBert()
    reference = TinyBert()
    reference.load_state_dict(model.state_dict())
    groups = param_groups(model, weight_decay_rate=0.05, layer_decay=0.7, weight_decay_key="weight_decay")
    opt = extend_with_lr_scale(torch.optim.AdamW)(groups, lr=1e-2)
    ref_named = dict(reference.named_parameters())
    ref_groups = [
        {"params": [ref_named[n] for n in _names(g)], "weight_decay": g["weight_decay"], "lr": 1e-2 * g["lr_scale"]}
        for g in groups
    ]
    ref = torch.optim.AdamW(ref_groups, lr=1e-2)
    ids = torch.randint(0, 11, (5, 3), generator=torch.Generator().manual_seed(1))
    for _ in range(4):
        for m, o in ((model, opt), (reference, ref)):
            o.zero_grad()
            m(ids).square().mean().backward()
            o.step()
    for (n, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), n
    assert all(g["lr"] == 1e-2 for g in opt.param_groups)


def test_layer_decay_survives_one_cycle_and_reduce_on_plateau():
    """The scheduler writes the same lr into every group; the layer ratios hold at every step."""
    model = TinyBert(layers=2)
    groups = param_groups(model, layer_decay=0.5)
    opt = extend_with_lr_scale(danlu.SGD)(groups, lr=1.0)
    sched = S.OneCycleLR(opt, max_lr=0.5, total_steps=5, cycle_momentum=False)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        lr = opt.param_groups[0]["lr"]
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        for g in opt.param_groups:
            for n, p in g["params"] if isinstance(g["params"][0], tuple) else zip(g["param_names"], g["params"]):
                torch.testing.assert_close(snapshot[n] - p.detach(), torch.full_like(p, lr * g["lr_scale"]))
                snapshot[n] = p.detach().clone()
        sched.step()
    plateau = S.ReduceLROnPlateau(opt, factor=0.1, patience=0, min_lr=1e-3)
    plateau.step(1.0)
    plateau.step(2.0)
    assert {g["lr"] for g in opt.param_groups} == {max(opt.param_groups[0]["lr"], 1e-3)}


def test_state_dict_keeps_lr_scale():
    model = TinyBert()
    opt = build_optimizer(model, "adamw", lr=1e-3, weight_decay_rate=0.01, layer_decay=0.8)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state_dict()
    fresh = build_optimizer(model, "adamw", lr=5.0, weight_decay_rate=0.01, layer_decay=0.8)
    for g in fresh.param_groups:
        g["lr_scale"] = 1.0
    fresh.load_state_dict(state)
    assert [g["lr_scale"] for g in fresh.param_groups] == [g["lr_scale"] for g in opt.param_groups]
    assert fresh.param_groups[0]["lr"] == 1e-3


def test_build_optimizer_specs():
    model = TinyBert()
    lamb = build_optimizer(model, "lamb+ema", lr=1e-3, weight_decay_rate=0.01, layer_decay=0.9)
    assert type(lamb).__name__ == "LambWithExponentialMovingAverageWithLRScale"
    assert {g["weight_decay_rate"] for g in lamb.param_groups} == {0.0, 0.01}
    torch_adamw = build_optimizer(model, "torch.AdamW+lookahead", lr=1e-3, weight_decay=0.05)
    assert isinstance(torch_adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in torch_adamw.param_groups] == [0.05, 0.0]
    assert "lr_scale" not in torch_adamw.param_groups[0]
    adam = build_optimizer(model, "adam", lr=1e-3)  # no decay anywhere: no decay key in the groups
    assert all("weight_decay" not in g for g in adam.param_groups)
    # a training step runs
    ids = torch.randint(0, 11, (2, 3))
    for opt in (lamb, torch_adamw, adam):
        opt.zero_grad()
        model(ids).sum().backward()
        opt.step()
