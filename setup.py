"""Build danlu's native CPU kernels into the package: every instruction-set variant of the build machine's platform.

The kernels are plain C++ (no torch or Python headers), compiled by the system compiler with the same
flags that ``danlu._native`` uses at first use; the wheel is therefore tagged ``py3-none-<platform>``.
A machine without a working compiler gets a package without them (a warning says so), and danlu falls
back at run time; ``DANLU_REQUIRE_NATIVE=1`` makes that a build error instead.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path
from types import ModuleType

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
PACKAGE = HERE / "src" / "danlu"


def _build_rules() -> ModuleType:
    """``danlu._native_build``, loaded from its file: importing ``danlu`` would import torch."""
    spec = importlib.util.spec_from_file_location("_danlu_native_build", PACKAGE / "_native_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class NativeDistribution(Distribution):
    """A distribution with compiled content, so that it is built as a platform wheel and runs ``build_ext``."""

    def has_ext_modules(self) -> bool:
        return True


class BuildKernels(build_ext):
    """Compile ``_kernels.cpp`` once per instruction-set variant into the package (in place for editable installs)."""

    def run(self) -> None:
        self._outputs: list[str] = []
        if platform.system() not in ("Linux", "Darwin"):
            self._skip(f"native kernels are not built on {platform.system()}")
            return
        rules = _build_rules()
        compiler = rules.find_compiler()
        if compiler is None:
            self._skip("no C++ compiler found (set CXX)")
            return
        directory = (PACKAGE if self.inplace else Path(self.build_lib) / "danlu") / rules.LIBRARY_DIR
        print(f"danlu: compiling the native kernels ({', '.join(rules.variants())}) with {compiler}", file=sys.stderr)
        try:
            # in place (editable installs), a library of this very source and flags is kept
            built = rules.build_all(compiler, PACKAGE / rules.SOURCE_NAME, directory, keep_built=self.inplace)
        except (OSError, RuntimeError) as exc:
            self._skip(str(exc))
            return
        self._outputs = [str(path) for path in built]

    def _skip(self, reason: str) -> None:
        if os.environ.get("DANLU_REQUIRE_NATIVE") == "1":
            raise SystemExit(f"danlu: the native kernels did not build: {reason}")
        print(f"warning: danlu is packaged without its native kernels ({reason}); it will build them at first "
              "use where it can, and otherwise run its pure-PyTorch path", file=sys.stderr)

    def get_outputs(self) -> list[str]:
        return list(getattr(self, "_outputs", []))

    def get_output_mapping(self) -> dict[str, str]:
        return {}


class PlatformWheel(bdist_wheel):
    """Tag the wheel for the platform only: the libraries use no Python ABI."""

    def get_tag(self) -> tuple[str, str, str]:
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(distclass=NativeDistribution, cmdclass={"build_ext": BuildKernels, "bdist_wheel": PlatformWheel})
