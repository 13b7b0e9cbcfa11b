"""Which instruction-set build of the fused CPU loops (``csrc/fused_rows_cpu.cpp``) to run.

The loops are compiled once per instruction set with explicit flags (never
``-march=native``, whose code lands in a cache that nodes with other CPUs may share),
and the variant matching what ATen itself runs (``torch.backends.cpu.get_cpu_capability()``,
which also honours ``ATEN_CPU_CAPABILITY``) is loaded. ``TORCHREC_ADAPTIVE_CPU_ISA``
forces a lower variant, e.g. to measure the AVX2 build on an AVX-512 machine.

This module imports only the standard library at module level: ``setup.py`` loads it by
path to build the variants at install time, before the package is importable.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path

ENV = "TORCHREC_ADAPTIVE_CPU_ISA"
SOURCE = Path(__file__).parent / "csrc" / "fused_rows_cpu.cpp"

# Lowest to highest. The flags are ATen's own per-capability ones (aten/src/ATen/native/cpu:
# AVX2 = avx2 + fma; AVX512 = avx512 f/bw/vl/dq + fma), so a variant never needs more than
# the capability it is picked for.
VARIANTS: dict[str, tuple[str, ...]] = {
    "default": (),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "avx512": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
               "-mprefer-vector-width=512"),
}
COMMON_FLAGS = ("-O3", "-fno-math-errno", "-fopenmp")  # OpenMP: at::parallel_for's threads are inlined here
LDFLAGS = ("-fopenmp",)
_ATEN = {"DEFAULT": "default", "AVX2": "avx2", "AVX512": "avx512"}  # anything else (VSX, SVE, ...): default


def buildable_variants() -> tuple[str, ...]:
    """The variants worth compiling on this platform (x86 flags only on x86)."""
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        return tuple(VARIANTS)
    return ("default",)


def detected() -> str:
    """The variant matching the instruction set ATen uses on this CPU."""
    import torch

    return _ATEN.get(torch.backends.cpu.get_cpu_capability(), "default")


def selected() -> str:
    """The variant to load: ``detected()``, or the lower one ``TORCHREC_ADAPTIVE_CPU_ISA`` asks for.

    Raises ``ValueError`` naming the variable for an unknown value or one this CPU
    (as ATen sees it) cannot run.
    """
    best = detected()
    want = os.environ.get(ENV, "").strip().lower()
    if not want:
        return best
    names = list(VARIANTS)
    if want not in VARIANTS:
        raise ValueError(f"{ENV}={want!r} is not a CPU variant; use one of {', '.join(names)} (or unset it)")
    if names.index(want) > names.index(best):
        raise ValueError(
            f"{ENV}={want!r} asks for code this CPU cannot run: ATen reports "
            f"{best!r} as its best instruction set here; use one of {', '.join(names[: names.index(best) + 1])}"
        )
    return want


def module_name(isa: str) -> str:
    """The extension's name for ``isa``: in the JIT cache directory's name too, so builds
    for different instruction sets never share a cache entry."""
    return f"_fused_rows_cpu_{isa}"


def source_hash() -> str:
    """Hash of the C++ source and the flags: a prebuilt module with another hash is stale."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update(repr((COMMON_FLAGS, VARIANTS)).encode())
    return h.hexdigest()[:16]


def cflags(isa: str) -> list[str]:
    """Compiler flags of one variant, with its name and the source hash compiled in."""
    # bare tokens, stringified in C++: quotes do not survive every build tool's command line
    return [*COMMON_FLAGS, *VARIANTS[isa], f"-DTORCHREC_ADAPTIVE_ISA={isa}",
            f"-DTORCHREC_ADAPTIVE_SOURCE_HASH={source_hash()}"]
