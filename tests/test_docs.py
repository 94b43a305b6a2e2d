"""The documentation: its code runs, its pages exist, and (where mkdocs is installed) it builds strictly."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
OTHER_PARTS = {"distributed.md", "performance.md", "arena.md"}  # see docs/_ext/hooks.py


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def test_quickstart_runs(tmp_path, monkeypatch):
    """Every code block of the quick start, in order, in one namespace: the five-minute path works."""
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    blocks = _python_blocks("quickstart.md")
    assert len(blocks) >= 5
    for block in blocks:
        exec(compile(block, "quickstart.md", "exec"), namespace)
    assert namespace["opt"].param_groups[0]["applied_steps"] == 8
    assert (tmp_path / "model-ema.pt").is_file() and (tmp_path / "ckpt.pt").is_file()


def test_migration_recipe_runs():
    """The translated bert4keras recipe at the end of the migration guide runs."""
    train = "for _ in range(4):\n    model(torch.randn(2, 3)).sum().backward(); optimizer.step(); optimizer.zero_grad()\n"
    block = _python_blocks("migration.md")[-1].replace("\n...\n", "\n" + train)
    model = torch.nn.Linear(3, 2)
    namespace = {"model": model}
    exec(compile(block.replace('"best.pt"', "__import__('io').BytesIO()"), "migration.md", "exec"), namespace)
    assert type(namespace["optimizer"]).__name__ == "AdamEMAG"


def _nav_pages(items) -> list[str]:
    pages = []
    for item in items:
        value = next(iter(item.values())) if isinstance(item, dict) else item
        pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


def _config() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/name:", lambda loader, suffix, node: None)
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)


def test_every_nav_page_exists_and_every_page_is_in_the_nav():
    nav = _nav_pages(_config()["nav"])
    missing = [p for p in nav if not (DOCS / p).is_file() and p not in OTHER_PARTS]
    assert not missing
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "_ext" not in p.parts}
    assert pages - set(nav) == set()


def test_every_derivation_and_optimizer_has_a_page():
    import danlu

    nav = " ".join(_nav_pages(_config()["nav"]))
    for name in ("SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "NAdam", "RAdam", "Adafactor", "Lion", "Adamax", "Muon",
                 "LazyAdam", "AdamW", "Lamb", "Ranger"):
        assert f"optimizers/{name.lower()}.md" in nav
        assert f"::: danlu.{name}" in (DOCS / "optimizers" / f"{name.lower()}.md").read_text()
    for function in (n for n in danlu.__all__ if n.startswith("extend_with_")):
        slug = function[len("extend_with_"):]
        assert f"derivations/{slug}.md" in nav, function


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent / "mkdocs").exists(),
                    reason="mkdocs is not installed (pip install -e .[docs])")
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "site" / "migration" / "index.html").is_file()


def test_version_changelog_and_package_agree():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    import danlu

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert danlu.__version__ == version
    first = re.search(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert first is not None and first.group(1) == version
