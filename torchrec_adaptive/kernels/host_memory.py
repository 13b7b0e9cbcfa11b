"""Host memory for CPU training: the kernel's large buffers in transparent huge pages,
and the allocator settings we recommend for CPU training processes.

Why: a training step touches a few random rows of every table and of every optimizer
state; with 4 KiB pages each such row is also a TLB miss (page walk) in buffers of
hundreds of MB, and on CPU that, not bandwidth, bounds the fused update loops. Advising
the buffers with ``madvise(MADV_HUGEPAGE)`` before they are first touched lets Linux
back them with 2 MiB pages: the fused Adam loop alone, at kernel_step's pooling-1 shape,
took 2.9 ms instead of 4.3 on the EPYC-512 VM (docs/performance.md). PyTorch does this for *every* allocation of 2 MiB or
more under ``THP_MEM_ALLOC_ENABLE=1`` (c10's ``alloc_cpu``); here only the kernel's own
buffers get it, with no setting. No torch or FBGEMM API advises one tensor, hence
``ctypes``. Best effort: where the advice is unavailable (not Linux, THP ``never``)
nothing changes but speed. ``TORCHREC_ADAPTIVE_HUGE_PAGES=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import sys

import torch
from torch import Tensor

# glibc's allocator for a CPU training process: with its defaults, a step's multi-MB
# temporaries (the pooled output, its gradient) are often returned to the OS when freed and
# page-faulted back in at the next step, which on the VMs of docs/performance.md costs more
# than the lookup itself (~30 ms for 27 MB) and makes step times depend on the order of
# allocations. Keeping up to 32 MB allocations on the heap and not trimming it avoids that.
# Read by glibc at process start, so launchers set it (launch/components.py, benchmarks/).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}

MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
HUGE_PAGE = 2 << 20
ENV = "TORCHREC_ADAPTIVE_HUGE_PAGES"


def _madvise():  # noqa: ANN202 - a ctypes function or None
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_MADVISE = _madvise()


def advise(t: Tensor) -> bool:
    """Asks for huge pages on the 2 MiB-aligned interior of ``t``'s memory (a CPU tensor);
    True if the kernel took the advice. Pages already touched keep their size until
    Linux's khugepaged merges them, so call this before filling the tensor."""
    if _MADVISE is None or t.device.type != "cpu" or os.environ.get(ENV, "1") == "0":
        return False
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    last = end // HUGE_PAGE * HUGE_PAGE
    if last <= first:
        return False
    return _MADVISE(first, last - first, MADV_HUGEPAGE) == 0


def empty(numel: int, *, dtype: torch.dtype | None = None, device: torch.device) -> Tensor:
    """``torch.empty`` of a 1-D buffer, advised into huge pages first when it is on the CPU."""
    t = torch.empty(numel, dtype=dtype, device=device)
    if numel * t.element_size() >= 2 * HUGE_PAGE:
        advise(t)
    return t


def full(numel: int, value: float, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.full`` of a 1-D buffer, advised into huge pages before it is filled."""
    return empty(numel, dtype=dtype, device=device).fill_(value)
