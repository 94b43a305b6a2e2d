"""create_optimizer: the grammar, the BERT no-decay convention, errors that list the valid names."""

from __future__ import annotations

import re

import pytest
import torch

import danlu
from danlu.factory import DERIVATION_NAMES, OPTIMIZER_NAMES, no_decay_names, parse_spec


def bert_like() -> torch.nn.Module:
    return torch.nn.ModuleDict(
        {
            "embeddings": torch.nn.Embedding(20, 8),
            "dense": torch.nn.Linear(8, 8),
            "LayerNorm": torch.nn.LayerNorm(8),
            "classifier": torch.nn.Linear(8, 3),
        }
    )


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_base_name_builds_and_steps(name: str) -> None:
    model = bert_like()
    opt = danlu.create_optimizer(model, name, lr=0.01)
    out = model["classifier"](model["LayerNorm"](model["dense"](model["embeddings"](torch.tensor([1, 2])))))
    out.sum().backward()
    opt.step()


REQUIRED_OPTIONS = {"clip": {"global_clipnorm": 1.0}}
"""Derivations with an option that has no default (exactly one clipping option must be chosen)."""


@pytest.mark.parametrize("name", DERIVATION_NAMES)
def test_every_derivation_name_builds(name: str) -> None:
    opt = danlu.create_optimizer(bert_like(), f"adam+{name}", lr=0.01, **REQUIRED_OPTIONS.get(name, {}))
    assert type(opt)._danlu_derivations[-1].name == name


def test_spec_order_is_application_order() -> None:
    opt = danlu.create_optimizer(bert_like(), "adam+weight_decay+layer_adaptation", lr=0.01)
    assert [d.name for d in type(opt)._danlu_derivations] == ["weight_decay", "layer_adaptation"]
    assert isinstance(opt, danlu.Adam)


def test_spec_equals_the_hand_derived_class() -> None:
    torch.manual_seed(0)
    model_a, model_b = bert_like(), bert_like()
    model_b.load_state_dict(model_a.state_dict())
    a = danlu.create_optimizer(model_a, "radam + lookahead", lr=0.01)
    b = danlu.Ranger(model_b.named_parameters(), lr=0.01)
    for model, opt in ((model_a, a), (model_b, b)):
        for _ in range(7):
            opt.zero_grad()
            model["dense"](model["embeddings"](torch.tensor([3, 4]))).pow(2).sum().backward()
            opt.step()
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(p, q)


def test_bert_convention_puts_biases_and_norms_in_a_no_decay_group() -> None:
    model = bert_like()
    opt = danlu.create_optimizer(model, "adamw", lr=1e-3, weight_decay_rate=0.01)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay_rate"] == 0.01 and no_decay["weight_decay_rate"] == 0.0
    assert set(no_decay["param_names"]) == {"dense.bias", "LayerNorm.weight", "LayerNorm.bias", "classifier.bias"}
    assert set(decay["param_names"]) == {"embeddings.weight", "dense.weight", "classifier.weight"}


def test_bert_convention_can_be_turned_off_or_replaced() -> None:
    opt = danlu.create_optimizer(bert_like(), "lamb", no_decay_on_bias_and_norm=False)
    assert len(opt.param_groups) == 1
    opt = danlu.create_optimizer(bert_like(), "adamw", exclude_from_weight_decay=["LayerNorm"])
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["exclude_from_weight_decay"] == ("LayerNorm",)


def test_no_decay_names_from_named_parameters() -> None:
    pairs = [
        ("encoder.layer.0.attention.output.LayerNorm.weight", torch.ones(4)),
        ("encoder.layer.0.attention.output.dense.bias", torch.ones(4)),
        ("encoder.layer.0.attention.output.dense.weight", torch.ones(4, 4)),
        ("ln_f.weight", torch.ones(4)),
        ("h.0.mlp.c_fc.weight", torch.ones(4, 4)),
    ]
    assert no_decay_names(pairs) == [pairs[0][0], pairs[1][0], pairs[3][0]]


def test_aliases_and_case() -> None:
    assert parse_spec("AdamW+LA+EMA+accum") == ("adamw", ["lookahead", "ema", "gradient_accumulation"])
    assert parse_spec("torch.AdamW+wd") == ("torch.AdamW", ["weight_decay"])


def test_torch_optim_base() -> None:
    opt = danlu.create_optimizer(bert_like(), "torch.AdamW+lookahead", lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("adamx", "unknown optimizer 'adamx'; valid optimizers: sgd, sgdm, nag"),
        ("adam+lookahaed", "unknown derivation 'lookahaed' in 'adam+lookahaed'; valid derivations: weight_decay"),
        ("adam++ema", "invalid spec"),
        ("", "invalid spec"),
        ("adam+ema+ema", "appears twice"),
        ("torch.Nope", "torch.optim has no optimizer class 'Nope'"),
    ],
)
def test_bad_spec_lists_the_valid_names(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        danlu.create_optimizer(bert_like(), spec)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="spec must be a string"):
        danlu.create_optimizer(bert_like(), ["adam"])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model_or_named_params"):
        danlu.create_optimizer(torch.ones(3), "adam")
    with pytest.raises(TypeError, match="model_or_named_params"):
        danlu.create_optimizer([torch.nn.Parameter(torch.ones(3))], "adam")
    with pytest.raises(ValueError, match="no parameters"):
        danlu.create_optimizer([], "adam")
    with pytest.raises(TypeError, match="unexpected keyword argument 'learning_rate'"):
        danlu.create_optimizer(bert_like(), "adam", learning_rate=0.1)
    with pytest.raises(ValueError, match="Invalid lr"):
        danlu.create_optimizer(bert_like(), "adamw+ema", lr=-1)
