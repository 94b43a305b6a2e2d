"""Every docstring example of danlu's modules runs as a doctest, and every public name has one."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil

import pytest
import torch

import danlu

# Modules whose imports need optional packages: their doctests run only where those are installed.
OPTIONAL = {"danlu.integrations.transformers": ("transformers", "accelerate"), "danlu.integrations.lightning": ("lightning",)}
# Public modules whose every public class and function must carry an example.
PUBLIC_MODULES = [
    "danlu.derivations",
    "danlu.optimizers",
    "danlu",
    "danlu.factory",
    "danlu.derive",
    "danlu.schedules",
    "danlu.grouping",
    "danlu.integrations",
    "danlu.integrations.transformers",
    "danlu.integrations.lightning",
]


def _modules() -> list[str]:
    names = ["danlu"]
    for info in pkgutil.walk_packages(danlu.__path__, "danlu."):
        if ".cli" in info.name or info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return sorted(names)


def _import(name: str):
    for package in OPTIONAL.get(name, ()):
        pytest.importorskip(package)
    return importlib.import_module(name)


@pytest.mark.parametrize("name", _modules())
def test_doctests(name, tmp_path, monkeypatch):
    module = _import(name)
    monkeypatch.chdir(tmp_path)  # examples that write files (TrainingArguments("out")) write here
    dtype = torch.get_default_dtype()
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    try:
        for test in finder.find(module, name, globs={**vars(module)}):
            runner.run(test)
    finally:
        torch.set_default_dtype(dtype)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) of {name} failed (run: python -m pytest --doctest-modules)"


def _public_objects():
    for name in PUBLIC_MODULES:
        try:
            module = _import(name)
        except pytest.skip.Exception:
            continue
        for attr in getattr(module, "__all__", ()):
            obj = getattr(module, attr)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                yield f"{name}.{attr}", obj


def test_every_public_class_and_function_has_an_example():
    missing = sorted({path for path, obj in _public_objects() if ">>>" not in (obj.__doc__ or "")})
    assert not missing, f"public names without a docstring example: {missing}"
