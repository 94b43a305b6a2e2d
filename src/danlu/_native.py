"""Build, cache and load danlu's native CPU kernels (``_kernels.cpp``), called through ctypes.

The kernels include no torch header, so they build in a few seconds with the system C++ compiler.
The shared library is cached under ``$DANLU_CACHE_DIR`` (default ``~/.cache/danlu``), keyed by the
source, the compiler and the instruction set, so only the first process on a machine pays the build;
later processes load it in milliseconds. Without a compiler, or with ``DANLU_NATIVE=0``, every danlu
optimizer runs its pure-PyTorch path (``torch._foreach_*``), which gives the same results.

Environment:
    ``DANLU_NATIVE``: ``0`` disables the native kernels; ``1`` (default) builds them at the first step
    that needs them (seconds, once per machine); ``background`` builds them in a thread and runs the
    pure-PyTorch path until they are loaded.
    ``DANLU_CACHE_DIR``: where the built library is kept.
    ``CXX``: the compiler (default ``c++``, then ``g++``, then ``clang++``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

__all__ = ["load", "available", "build_seconds", "disable", "enable", "status"]

_SOURCE = Path(__file__).with_name("_kernels.cpp")
_ABI = 5
_lock = threading.Lock()
_setting = os.environ.get("DANLU_NATIVE", "1").strip().lower()
_background = _setting == "background"
_build_lock = threading.Lock()


class _State:
    """What this process knows about the library (one instance, module-level)."""

    lib: ctypes.CDLL | None = None
    tried = False
    error: str | None = None
    build_seconds: float | None = None
    load_seconds: float | None = None
    enabled = _setting not in ("0", "false", "off", "no")
    thread: threading.Thread | None = None


_S = _State()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _arch_flags() -> list[str]:
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512"):
        return ["-march=x86-64-v4", "-mprefer-vector-width=512"]
    if capability.startswith("AVX2"):
        return ["-march=x86-64-v3"]
    return []


def _flags() -> list[str]:
    return ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-ffp-contract=off", *_arch_flags()]


def _cache_dir() -> Path:
    root = os.environ.get("DANLU_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "danlu" if xdg else Path.home() / ".cache" / "danlu"


def _library_path(compiler: str) -> Path:
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(" ".join(_flags()).encode())
    key.update(version.encode())
    key.update(f"{sys.platform}-{platform.machine()}".encode())
    return _cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *_flags(), str(_SOURCE), "-o", str(out)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(out, target)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    # every array is passed as an address (c_void_p): ctypes arrays and plain integers both fit
    vp = ctypes.c_void_p
    lib.danlu_abi_version.restype = ctypes.c_int
    lib.danlu_elementwise.restype = ctypes.c_int
    lib.danlu_elementwise.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, vp, vp, vp, vp, ctypes.c_int, ctypes.c_int, vp]
    lib.danlu_probe.restype = None
    lib.danlu_probe.argtypes = [ctypes.c_int64, vp, vp, ctypes.c_double]
    lib.danlu_increment.restype = None
    lib.danlu_increment.argtypes = [ctypes.c_int64, vp, vp]
    lib.danlu_adafactor.restype = ctypes.c_int
    lib.danlu_adafactor.argtypes = [ctypes.c_int, ctypes.c_int64, vp, vp, vp, vp, ctypes.c_int]
    if lib.danlu_abi_version() != _ABI:
        raise RuntimeError("stale danlu kernel library")
    return lib


def load() -> ctypes.CDLL | None:
    """The kernel library, building it on first use; None where it cannot be had (see :func:`status`).

    With ``DANLU_NATIVE=background`` a missing library is built in a background thread and this returns
    None until it is loaded, so the first steps run the pure-PyTorch path instead of waiting; the switch
    changes results at the level of rounding, which is why blocking (build once, then cached) is the default.
    """
    if _S.lib is not None or (_S.tried and _S.lib is None):
        return _S.lib if _S.enabled else None
    if not _S.enabled:
        return None
    if _background:
        with _lock:
            if _S.thread is None:
                _S.thread = threading.Thread(target=_load_blocking, name="danlu-native-build", daemon=True)
                _S.thread.start()
        return _S.lib
    return _load_blocking()


def _load_blocking() -> ctypes.CDLL | None:
    with _lock if not _background else _build_lock:
        if _S.tried:
            return _S.lib
        _S.tried = True
        start = time.perf_counter()
        try:
            if platform.system() != "Linux" and platform.system() != "Darwin":
                raise RuntimeError(f"native kernels are not built on {platform.system()}")
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError("no C++ compiler found (set CXX)")
            path = _library_path(compiler)
            if not path.exists():
                lock_path = path.with_suffix(".lock")
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(lock_path, "w") as handle:
                    try:
                        import fcntl

                        fcntl.flock(handle, fcntl.LOCK_EX)
                    except ImportError:  # pragma: no cover
                        pass
                    if not path.exists():
                        _build(compiler, path)
                        _S.build_seconds = time.perf_counter() - start
            _S.lib = _bind(ctypes.CDLL(str(path)))
            _S.load_seconds = time.perf_counter() - start
        except Exception as exc:  # any failure leaves the pure-PyTorch path
            _S.error = f"{type(exc).__name__}: {exc}"
            _S.lib = None
        return _S.lib


def available() -> bool:
    """Whether the native kernels are in use (building them now if needed)."""
    return load() is not None


def build_seconds() -> float | None:
    """Seconds this process spent building the library (None when it was loaded from the cache)."""
    return _S.build_seconds


def status() -> dict[str, object]:
    """What happened: enabled, loaded, the error if any, build and load seconds."""
    return {
        "enabled": _S.enabled,
        "loaded": _S.lib is not None,
        "error": _S.error,
        "build_seconds": _S.build_seconds,
        "load_seconds": _S.load_seconds,
        "background": _background,
    }


def disable() -> None:
    """Use the pure-PyTorch paths from now on, in this process."""
    _S.enabled = False


def enable() -> None:
    """Use the native kernels again (where they load)."""
    _S.enabled = True
