"""The native kernels: built into the package for every instruction-set variant, chosen at run time, and the
first-use build (said once) or the pure-PyTorch path (warned once) where the package has none."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from danlu import _native
from danlu import _native_build as rules

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("capability", "machine", "variant"), [
    ("AVX512", "x86_64", "avx512"),
    ("AVX2", "x86_64", "avx2"),
    ("DEFAULT", "x86_64", "default"),
    ("AVX2", "AMD64", "avx2"),
    ("SVE256", "aarch64", "default"),
    ("DEFAULT", "arm64", "default"),
])
def test_variant_follows_torch_capability(capability: str, machine: str, variant: str) -> None:
    assert rules.variant_for(capability, machine) == variant


def test_variants_per_platform() -> None:
    assert rules.variants("x86_64") == {
        "default": ("-march=x86-64", "-mtune=generic"),
        "avx2": ("-march=x86-64-v3",),
        "avx512": ("-march=x86-64-v4", "-mprefer-vector-width=512"),
    }
    assert rules.variants("aarch64") == {"default": ()}


def test_library_name_carries_the_source_and_the_variant() -> None:
    variant = next(iter(rules.variants()))
    name = rules.library_name(b"int x;", variant)
    assert name.startswith(f"kernels_{variant}-") and name.endswith(".so")
    assert rules.library_name(b"int y;", variant) != name
    assert len({rules.library_name(b"int x;", v) for v in rules.variants()}) == len(rules.variants())


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A process state where nothing is loaded yet, a package folder without libraries and an empty cache."""
    package = tmp_path / "package"
    package.mkdir()
    shutil.copy(_native._SOURCE, package / rules.SOURCE_NAME)
    monkeypatch.setattr(_native, "_S", _native._State())
    monkeypatch.setattr(_native, "_PACKAGE", package)
    monkeypatch.setattr(_native, "_SOURCE", package / rules.SOURCE_NAME)
    monkeypatch.setattr(_native, "_background", False)
    monkeypatch.setenv("DANLU_CACHE_DIR", str(tmp_path / "cache"))
    _native._S.enabled = True
    return package


@pytest.fixture(scope="module")
def built() -> Path:
    """The library this process loaded (before any test replaced the loader's state)."""
    if _native.load() is None:
        pytest.skip(f"no native kernels on this machine: {_native.status()['error']}")
    return Path(str(_native.status()["path"]))


def test_first_use_build_says_so_once(built: Path, fresh_state: Path, monkeypatch: pytest.MonkeyPatch,
                                      capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(rules, "find_compiler", lambda: "c++")
    monkeypatch.setattr(rules, "compile_library", lambda compiler, variant, source, target: shutil.copy(built, target))
    capfd.readouterr()
    assert _native.load() is not None and _native.load() is not None
    err = capfd.readouterr().err
    variant = _native._variant()
    assert err.splitlines() == [f"danlu: compiling its native CPU kernels ({variant}) with c++ into "
                                f"{os.environ['DANLU_CACHE_DIR']}, once per machine (5-20 s)"]
    status = _native.status()
    assert status["origin"] == "cache" and status["variant"] == variant and status["build_seconds"] is not None


def _expect_fallback_warning(match: str) -> dict[str, object]:
    with pytest.warns(RuntimeWarning, match=match) as warned:
        assert _native.load() is None
        assert _native.load() is None
    assert len(warned) == 1
    assert "danlu runs its pure-PyTorch path" in str(warned[0].message)
    return _native.status()


def test_no_compiler_warns_once_and_names_the_fallback(fresh_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "find_compiler", lambda: None)
    status = _expect_fallback_warning(r"^danlu: the native CPU kernels are not available \(RuntimeError: no C\+\+ "
                                      r"compiler found \(set CXX\)\)")
    assert status["loaded"] is False and status["error"] == "RuntimeError: no C++ compiler found (set CXX)"


def test_unwritable_cache_warns_once(fresh_state: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DANLU_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(rules, "find_compiler", lambda: "c++")
    _expect_fallback_warning(r"\(NotADirectoryError: .*Not a directory")


def test_prebuilt_library_with_another_abi_is_not_used(built: Path, fresh_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    variant = _native._variant()
    _native._prebuilt_path(variant).parent.mkdir()
    shutil.copy(built, _native._prebuilt_path(variant))
    monkeypatch.setattr(_native, "_ABI", -1)
    monkeypatch.setattr(rules, "find_compiler", lambda: None)
    _expect_fallback_warning("no C")
    assert _native.status()["prebuilt_error"] == f"{_native._prebuilt_path(variant).name}: RuntimeError: stale danlu kernel library"


def test_prebuilt_library_is_preferred_to_a_build(built: Path, fresh_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = _native._prebuilt_path(_native._variant())
    target.parent.mkdir()
    shutil.copy(built, target)
    monkeypatch.setattr(rules, "find_compiler", lambda: pytest.fail("a compiler was looked for"))
    assert _native.load() is not None
    assert _native.status()["origin"] == "package" and _native.status()["path"] == str(target)


# --- the built wheel ---------------------------------------------------------------------------------------------

def _build_wheel(directory: Path) -> Path:
    """Build the wheel of this checkout (without build isolation where this environment has a recent setuptools)."""
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(directory), str(ROOT)]
    try:
        if int(importlib.metadata.version("setuptools").split(".")[0]) >= 77:
            command.insert(4, "--no-build-isolation")
    except importlib.metadata.PackageNotFoundError:
        pass
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = directory.glob("danlu-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """$DANLU_WHEEL if set (CI builds it once), else a wheel built from this checkout."""
    given = os.environ.get("DANLU_WHEEL")
    if given:
        return Path(given)
    if rules.find_compiler() is None and os.environ.get("DANLU_REQUIRE_NATIVE") != "1":
        pytest.skip("no C++ compiler: the wheel is built without its native kernels")
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_carries_every_variant(wheel: Path) -> None:
    assert wheel.name.endswith(f"-py3-none-linux_{os.uname().machine}.whl") or sys.platform != "linux"
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(f"danlu/{rules.SOURCE_NAME}")
        names = {name for name in archive.namelist() if name.endswith(".so")}
    assert names == {f"danlu/_lib/{rules.library_name(source, variant)}" for variant in rules.variants()}


_STEP = """
w = torch.nn.Parameter(torch.tensor([-1.0, -0.5, 0.0, 0.25, 0.75, 1.0, 1.5]))
w.grad = torch.tensor([0.5, -0.25, 0.125, 3.0, -2.0, 1e-3, 0.0])
danlu.Adam([w], lr=0.1).step()
import numpy
gen = torch.Generator().manual_seed(0)
xs = [torch.randn(n, generator=gen, dtype=torch.float64).to(d) for n in (1, 65, 1000, 70001) for d in (torch.float32, torch.float64, torch.bfloat16)]
codes = numpy.array([{torch.float32: 0, torch.float64: 1, torch.bfloat16: 2}[x.dtype] for x in xs], dtype=numpy.int32)
ptrs, numel, sums = (numpy.array([x.data_ptr() for x in xs]), numpy.array([x.numel() for x in xs]), numpy.zeros(len(xs)))
assert _native.load().danlu_sum_squares(len(xs), numel.ctypes.data, ptrs.ctypes.data, codes.ctypes.data, 2, sums.ctypes.data) == 0
"""
_PROBE = "import json, torch, danlu\nfrom danlu import _native\n" + _STEP + """
print(json.dumps({"file": danlu.__file__, "status": _native.status(), "w": w.tolist(), "sums": [s.hex() for s in sums.tolist()]}))
"""


def _step_here() -> tuple[list[float], list[str]]:
    import danlu

    namespace = {"torch": torch, "danlu": danlu, "_native": _native}
    exec(_STEP, namespace)
    return namespace["w"].tolist(), [s.hex() for s in namespace["sums"].tolist()]


def _capabilities_of_this_cpu() -> list[str]:
    order = ["default", "avx2", "avx512"] if rules.is_x86_64() else ["default"]
    best = rules.variant_for(torch.backends.cpu.get_cpu_capability())
    return order[: order.index(best) + 1]


@pytest.mark.parametrize("capability", _capabilities_of_this_cpu())
def test_installed_wheel_loads_its_library_without_a_compiler(wheel: Path, capability: str, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    empty = tmp_path / "no-tools"
    empty.mkdir()
    cache = tmp_path / "cache"
    env = {"PATH": str(empty), "CXX": "false", "DANLU_CACHE_DIR": str(cache), "PYTHONPATH": str(target),
           "ATEN_CPU_CAPABILITY": capability, "DANLU_NATIVE": "1", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""
    report = json.loads(done.stdout)
    assert Path(report["file"]).parent == target / "danlu"
    assert report["status"]["origin"] == "package" and report["status"]["variant"] == capability
    assert Path(report["status"]["path"]).parent == target / "danlu" / "_lib"
    assert not cache.exists()
    assert _native.load() is not None, "the comparison needs the native kernels in this process too"
    # every variant rounds as this process's does (no contraction, IEEE ops), and sums the squares in the same order
    assert (report["w"], report["sums"]) == _step_here()
