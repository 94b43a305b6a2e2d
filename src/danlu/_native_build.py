"""How danlu's native kernels (``_kernels.cpp``) are compiled: the instruction-set variants and their flags.

Shared by the package build (``setup.py`` compiles every variant into the wheel) and by
:mod:`danlu._native` (which picks a variant at run time and compiles it on first use where the
package carries none). This module imports nothing outside the standard library, so that the build
can load it without torch.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE_NAME = "_kernels.cpp"
# A folder without __init__.py: module scanners (pkgutil, doctest collection) never take a library for a module.
LIBRARY_DIR = "_lib"
PREFIX = "kernels_"
COMMON_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-fno-math-errno", "-ffp-contract=off")

# Named after torch.backends.cpu.get_cpu_capability(), lower case: the variant torch picks is the one danlu picks.
_X86_VARIANTS: dict[str, tuple[str, ...]] = {
    "default": ("-march=x86-64", "-mtune=generic"),
    "avx2": ("-march=x86-64-v3",),
    "avx512": ("-march=x86-64-v4", "-mprefer-vector-width=512"),
}


def is_x86_64(machine: str | None = None) -> bool:
    """Whether ``machine`` (default: this one) is an x86-64 machine."""
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


def variants(machine: str | None = None) -> dict[str, tuple[str, ...]]:
    """The instruction-set variants built for ``machine`` (default: this one), each with its arch flags."""
    return dict(_X86_VARIANTS) if is_x86_64(machine) else {"default": ()}


def variant_for(capability: str, machine: str | None = None) -> str:
    """The variant to use where torch reports ``capability`` (``"AVX512"``, ``"AVX2"``, ``"DEFAULT"``, ...)."""
    name = capability.strip().lower()
    available = variants(machine)
    if name.startswith("avx512") and "avx512" in available:
        return "avx512"
    if name.startswith("avx2") and "avx2" in available:
        return "avx2"
    return "default"


def flags(variant: str) -> list[str]:
    """The compiler flags of ``variant``."""
    return [*COMMON_FLAGS, *variants()[variant]]


def source_key(source: bytes, variant: str) -> str:
    """A short hash of the source and the flags: a library built from other source is never taken for this one."""
    digest = hashlib.sha256(source)
    digest.update(" ".join(flags(variant)).encode())
    return digest.hexdigest()[:16]


def library_name(source: bytes, variant: str) -> str:
    """The file name of the prebuilt library of ``variant`` for this source (in the package's LIBRARY_DIR)."""
    return f"{PREFIX}{variant}-{source_key(source, variant)}.so"


def find_compiler() -> str | None:
    """``$CXX``, else the first of ``c++``, ``g++``, ``clang++`` on the PATH; None where there is none."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def compile_command(compiler: str, variant: str, source: Path, target: Path) -> list[str]:
    """The command that compiles ``source`` into the shared library ``target``."""
    return [compiler, *flags(variant), str(source), "-o", str(target)]


def compile_library(compiler: str, variant: str, source: Path, target: Path) -> None:
    """Compile ``source`` into ``target`` (written whole or not at all); RuntimeError with the compiler's output."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = compile_command(compiler, variant, source, out)
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-2000:]}")
        os.replace(out, target)


def build_all(compiler: str, source: Path, directory: Path, *, keep_built: bool = False) -> list[Path]:
    """Compile every variant of this machine into ``directory`` at once; remove libraries of other sources there.

    With ``keep_built``, a variant whose library of this very source and flags is there already is not compiled again.
    """
    code = source.read_bytes()
    directory.mkdir(parents=True, exist_ok=True)
    targets = {variant: directory / library_name(code, variant) for variant in variants()}
    for stale in directory.glob(f"{PREFIX}*.so"):
        if stale not in targets.values():
            stale.unlink()
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        jobs = []
        for variant, target in targets.items():
            if keep_built and target.is_file():
                continue
            cmd = compile_command(compiler, variant, source, Path(tmp) / target.name)
            jobs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        results = [(cmd, job.communicate(timeout=900)[1], job.returncode) for cmd, job in jobs]
        for cmd, err, returncode in results:
            if returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
        for cmd, _, _ in results:
            os.replace(cmd[-1], directory / Path(cmd[-1]).name)
    return list(targets.values())
