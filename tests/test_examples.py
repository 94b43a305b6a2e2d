"""Every script in examples/ runs on CPU with a small budget (in-process, through its main(argv))."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"danlu_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _isolated():
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    path = list(sys.path)
    yield
    sys.path[:] = path
    torch.set_default_dtype(dtype)


def test_every_example_is_tested():
    scripts = {p.stem for p in EXAMPLES.glob("*.py") if not p.stem.startswith("_")}
    tested = {"bert_finetune", "lamb_large_batch", "lazy_embeddings", "hf_trainer", "lightning_ema", "compile_loop"}
    assert scripts == tested


def test_bert_finetune():
    out = _load("bert_finetune").main(["--steps", "6"])
    assert out["applied_steps"] == 6  # 24 micro-batches, accumulated 4 by 4
    assert 0.0 <= out["ema_accuracy"] <= 1.0


def test_lamb_large_batch():
    out = _load("lamb_large_batch").main(["--epochs", "1", "--samples", "2048", "--batch", "256"])
    assert max(v for k, v in out.items() if k.startswith("lamb")) > 0.3


def test_lazy_embeddings():
    out = _load("lazy_embeddings").main(["--steps", "30", "--users", "500", "--items", "200"])
    assert out["LazyAdam, sparse gradients: rows absent from the last batch unchanged"] == 1.0
    assert out["Adam + extend_with_lazy_optimization, dense gradients: rows absent from the last batch unchanged"] == 1.0
    assert out["plain Adam, dense gradients: rows absent from the last batch unchanged"] == 0.0


def test_hf_trainer(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    out = _load("hf_trainer").main(["--steps", "6"])
    assert 0.0 <= out["eval_accuracy"] <= 1.0


def test_lightning_ema(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    monkeypatch.chdir(tmp_path)
    out = _load("lightning_ema").main(["--epochs", "1", "--samples", "128"])
    assert 0.0 <= out["val_acc"] <= 1.0


def test_compile_loop():
    torch._dynamo.reset()
    out = _load("compile_loop").main(["--steps", "8", "--backend", "aot_eager"])
    torch._dynamo.reset()
    assert out["last_loss"] < out["first_loss"]
