"""Load danlu's native CPU kernels (``_kernels.cpp``), called through ctypes; build them where the package has none.

The package is built with the kernels compiled for every instruction-set variant of its platform
(``setup.py``; on x86-64: baseline, AVX2 and AVX-512), and the variant is chosen at run time from
``torch.backends.cpu.get_cpu_capability()``, as torch chooses its own kernels (``ATEN_CPU_CAPABILITY``
lowers both). A prebuilt library is used only if it was compiled from this very source (its file name
carries a hash of the source and the flags) and reports the ABI that this module binds.

Where the package carries no usable library (an install made without a compiler, or an edited
``_kernels.cpp``), the first step that needs the kernels compiles the chosen variant with the system C++
compiler (no torch headers; 5-20 s, said once on stderr) and caches it under ``$DANLU_CACHE_DIR``
(default ``~/.cache/danlu``), keyed by the source, the flags and the compiler, so later processes load it
in milliseconds. If that fails too (no compiler, an unwritable cache), a warning says so once, and every
danlu optimizer runs its pure-PyTorch path (``torch._foreach_*``), which gives the same results.

Environment:
    ``DANLU_NATIVE``: ``0`` disables the native kernels; ``1`` (default) loads them, building them at the
    first step that needs them where the package has none; ``background`` builds them in a thread and
    runs the pure-PyTorch path until they are loaded.
    ``DANLU_CACHE_DIR``: where a library built at first use is kept.
    ``CXX``: the compiler (default ``c++``, then ``g++``, then ``clang++``).
    ``DANLU_REQUIRE_NATIVE``: ``1`` makes a package build without the kernels an error, and the test
    suite fail when they do not load.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from danlu import _native_build as rules

__all__ = ["load", "available", "build_seconds", "disable", "enable", "status"]

_PACKAGE = Path(__file__).resolve().parent
_SOURCE = _PACKAGE / rules.SOURCE_NAME
_ABI = 7
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
    variant: str | None = None
    path: Path | None = None
    origin: str | None = None  # "package" (prebuilt) or "cache" (built at first use, now or earlier)
    prebuilt_error: str | None = None


_S = _State()


def _variant() -> str:
    return rules.variant_for(torch.backends.cpu.get_cpu_capability())


def _prebuilt_path(variant: str) -> Path:
    return _PACKAGE / rules.LIBRARY_DIR / rules.library_name(_SOURCE.read_bytes(), variant)


def _cache_dir() -> Path:
    root = os.environ.get("DANLU_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "danlu" if xdg else Path.home() / ".cache" / "danlu"


def _cache_path(compiler: str, variant: str) -> Path:
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256()
    key.update(_SOURCE.read_bytes())
    key.update(" ".join(rules.flags(variant)).encode())
    key.update(version.encode())
    key.update(f"{sys.platform}-{platform.machine()}".encode())
    return _cache_dir() / f"kernels-{key.hexdigest()[:16]}.so"


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
    lib.danlu_scale.restype = None
    lib.danlu_scale.argtypes = [ctypes.c_int64, vp, vp, vp]
    lib.danlu_adafactor.restype = ctypes.c_int
    lib.danlu_adafactor.argtypes = [ctypes.c_int, ctypes.c_int64, vp, vp, vp, vp, ctypes.c_int]
    lib.danlu_sum_squares.restype = ctypes.c_int
    lib.danlu_sum_squares.argtypes = [ctypes.c_int64, vp, vp, vp, ctypes.c_int, vp]
    if lib.danlu_abi_version() != _ABI:
        raise RuntimeError("stale danlu kernel library")
    return lib


def load() -> ctypes.CDLL | None:
    """The kernel library (the package's prebuilt one, else built on first use); None where it cannot be had.

    With ``DANLU_NATIVE=background`` a library that must be built is built in a background thread and this
    returns None until it is loaded, so the first steps run the pure-PyTorch path instead of waiting; the
    switch changes results at the level of rounding, which is why blocking (build once, then cached) is the
    default. A prebuilt library is loaded at once in either mode.
    """
    if not _S.enabled:
        return None
    if _S.tried:
        return _S.lib
    if _background:
        with _lock:
            if _S.thread is None and not _S.tried:
                if _load_prebuilt():
                    _S.tried = True
                    return _S.lib
                _S.thread = threading.Thread(target=_load_blocking, name="danlu-native-build", daemon=True)
                _S.thread.start()
        return _S.lib
    return _load_blocking()


def _load_blocking() -> ctypes.CDLL | None:
    with _lock if not _background else _build_lock:
        if _S.tried:
            return _S.lib
        start = time.perf_counter()
        if _S.lib is None and not _load_prebuilt():
            _load_cached()
        _S.tried = True
        if _S.lib is not None:
            _S.load_seconds = time.perf_counter() - start
        return _S.lib


def _load_prebuilt() -> bool:
    """Load the package's library for this CPU, if the package carries one built from this source."""
    variant = _variant()
    path = _prebuilt_path(variant)
    if not path.is_file():
        return False
    try:
        _S.lib = _bind(ctypes.CDLL(str(path)))
    except Exception as exc:  # a library that does not load or bind is rebuilt from the source
        _S.prebuilt_error = f"{path.name}: {type(exc).__name__}: {exc}"
        return False
    _S.variant, _S.path, _S.origin = variant, path, "package"
    return True


def _load_cached() -> None:
    """Load the library from the cache, compiling it there first if needed; warn once where that fails."""
    variant = _variant()
    try:
        if platform.system() not in ("Linux", "Darwin"):
            raise RuntimeError(f"native kernels are not built on {platform.system()}")
        compiler = rules.find_compiler()
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set CXX)")
        path = _cache_path(compiler, variant)
        if not path.exists():
            _build_locked(compiler, variant, path)
        _S.lib = _bind(ctypes.CDLL(str(path)))
        _S.variant, _S.path, _S.origin = variant, path, "cache"
    except Exception as exc:  # any failure leaves the pure-PyTorch path
        _S.error = f"{type(exc).__name__}: {exc}"
        _S.lib = None
        first_line = _S.error.splitlines()[0]
        warnings.warn(f"danlu: the native CPU kernels are not available ({first_line}); danlu runs its pure-PyTorch "
                      "path, with the same results, more slowly (DANLU_NATIVE=0 chooses that path and silences this)",
                      RuntimeWarning, stacklevel=5)


def _build_locked(compiler: str, variant: str, path: Path) -> None:
    """Compile ``variant`` into ``path`` unless another process does it first (a file lock beside it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as handle:
        try:
            import fcntl

            fcntl.flock(handle, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover
            pass
        if path.exists():
            return
        print(f"danlu: compiling its native CPU kernels ({variant}) with {compiler} into {path.parent}, "
              "once per machine (5-20 s)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        rules.compile_library(compiler, variant, _SOURCE, path)
        _S.build_seconds = time.perf_counter() - start


def available() -> bool:
    """Whether the native kernels are in use (building them now if needed)."""
    return load() is not None


def build_seconds() -> float | None:
    """Seconds this process spent building the library (None when it was prebuilt or found in the cache)."""
    return _S.build_seconds


def status() -> dict[str, object]:
    """What happened: enabled, loaded, from where, which variant, the error if any, build and load seconds."""
    return {
        "enabled": _S.enabled,
        "loaded": _S.lib is not None,
        "origin": _S.origin,
        "variant": _S.variant,
        "path": str(_S.path) if _S.path else None,
        "error": _S.error,
        "prebuilt_error": _S.prebuilt_error,
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
