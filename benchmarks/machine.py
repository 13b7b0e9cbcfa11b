"""What a benchmark ran on, printed and stored with every number (docs/performance.md
keeps one table per machine): CPU model, cores, threads, the instruction set ATen,
FBGEMM and our fused CPU loops use, and the load average (this VM is shared).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any


def _cpuinfo() -> tuple[str, set[str]]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), set()
    model, flags = platform.processor() or platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
            model = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return model, flags


def fbgemm_isa(flags: set[str]) -> str:
    """The instruction set FBGEMM's CPU kernels dispatch to at run time: its
    ``fbgemmHasAvx512Support()`` needs avx512 f/bw/dq/vl, ``fbgemmHasAvx2Support()`` avx2 + fma
    (fbgemm/src/Utils.cc); ``FBGEMM_ENABLE_INSTRUCTIONS`` may lower it."""
    forced = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS")
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        best = "avx512"
    elif {"avx2", "fma"} <= flags:
        best = "avx2"
    else:
        best = "scalar (no AVX2)"
    return f"{best} (FBGEMM_ENABLE_INSTRUCTIONS={forced})" if forced else best


def parse_cpu_args(ap: Any, argv: list[str] | None = None) -> Any:
    """Parses a CPU benchmark's arguments with the two flags they all take, ``--threads`` and
    ``--no-malloc-env``; run as a script (``argv`` None) it first re-runs itself with the
    allocator set (:func:`malloc_env`), then sets torch's threads."""
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--no-malloc-env", action="store_true",
                    help="glibc's allocator defaults instead of host_memory.MALLOC_ENV (for every case alike)")
    args = ap.parse_args(argv)
    if argv is None:
        malloc_env(not args.no_malloc_env)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def malloc_env(enabled: bool) -> None:
    """Re-runs this benchmark with glibc's allocator set as we recommend for CPU training
    (``host_memory.MALLOC_ENV``; glibc reads it at process start, hence the re-exec), so
    every case of the run, FBGEMM's and stock TorchRec's included, gets the same
    allocator. ``enabled`` False (``--no-malloc-env``): glibc's defaults."""
    import sys

    from torchrec_adaptive.kernels.host_memory import MALLOC_ENV

    if enabled and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **MALLOC_ENV})


def describe() -> dict[str, Any]:
    """This machine and process, for a benchmark's header and JSON."""
    import torch

    from torchrec_adaptive.kernels import fused_cpu

    model, flags = _cpuinfo()
    ext = fused_cpu.extension()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "aten_isa": torch.backends.cpu.get_cpu_capability(),
        "fbgemm_isa": fbgemm_isa(flags),
        "ours_isa": ext.isa if ext is not None else "eager chain (no fused loops)",
        "ours_isa_forced": os.environ.get("TORCHREC_ADAPTIVE_CPU_ISA") or None,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "malloc_env": {k: os.environ[k] for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_") if k in os.environ},
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "torch": torch.__version__,
    }


def header(info: dict[str, Any]) -> str:
    return (f"machine: {info['cpu']}, {info['cores']} cores, {info['torch_threads']} torch threads | ISA: "
            f"ATen {info['aten_isa']}, FBGEMM {info['fbgemm_isa']}, ours {info['ours_isa']}"
            f"{' (forced)' if info['ours_isa_forced'] else ''} | load average {info['loadavg_1_5_15']} | "
            f"glibc malloc {'as recommended (MALLOC_ENV)' if info.get('malloc_env') else 'defaults'}")
