"""Builds the fused CPU loops (``torchrec_adaptive/kernels/csrc/fused_rows_cpu.cpp``) at install,
once per instruction set (``kernels/cpu_isa.py``), next to the package's modules.

The metadata is in pyproject.toml; this file only adds the extensions. They need torch
at build time, so they are built when the build sees the installed torch
(``pip install --no-build-isolation -e .``, what ``scripts/bootstrap.sh`` runs). Without
torch, or when a variant fails to compile (no compiler), the install still succeeds and
the package compiles the variant it needs on first use instead (``kernels/fused_cpu.py``).
``TORCHREC_ADAPTIVE_BUILD_CPU=0`` skips the build.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent


def _cpu_isa():
    """kernels/cpu_isa.py, loaded by path: the package itself is not importable yet."""
    spec = importlib.util.spec_from_file_location("_tra_cpu_isa", ROOT / "torchrec_adaptive" / "kernels" / "cpu_isa.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _variant_source(isa, variant: str) -> str:  # noqa: ANN001 - the cpu_isa module
    """A one-line source per variant that includes the real one: the build names object
    files after their source, so variants built from one file would overwrite each other."""
    path = ROOT / "build" / "cpu_variants" / f"fused_rows_cpu_{variant}.cpp"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f'#include "{isa.SOURCE.resolve()}"\n'
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return str(path.relative_to(ROOT))


def _extensions() -> tuple[list, dict]:
    if os.environ.get("TORCHREC_ADAPTIVE_BUILD_CPU", "1") == "0":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # an isolated build without torch: compiled on first use instead
        return [], {}
    isa = _cpu_isa()
    exts = [
        CppExtension(f"torchrec_adaptive.kernels.{isa.module_name(v)}", [_variant_source(isa, v)],
                     extra_compile_args=isa.cflags(v), extra_link_args=list(isa.LDFLAGS))
        for v in isa.buildable_variants()
    ]

    class TolerantBuild(BuildExtension):
        """A variant that fails to build is left to the first-use build. One at a time:
        BuildExtension's ninja file is one per build directory, so parallel builds clash."""

        def build_extensions(self) -> None:
            self._failed: set[str] = set()
            super().build_extensions()
            # the install then copies only what was built
            self.extensions = [e for e in self.extensions if e.name not in self._failed]

        def build_extension(self, ext) -> None:  # noqa: ANN001 - setuptools' Extension
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001 - a missing compiler must not fail the install
                self._failed.add(ext.name)
                print(f"torchrec_adaptive: not building {ext.name} now ({type(e).__name__}: {str(e)[:200]}); "
                      "it is compiled on first use instead", file=sys.stderr)

    return exts, {"build_ext": TolerantBuild.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
