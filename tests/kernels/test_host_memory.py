"""The kernel's large CPU buffers are advised into transparent huge pages (kernels/host_memory.py).

The oracle is Linux's own record of the advice: the ``hg`` flag ("huge page advise") in
/proc/self/smaps' VmFlags of the mapping that holds the buffer."""

from __future__ import annotations

import sys

import pytest
import torch

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec
from torchrec_adaptive.kernels import host_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc/self/smaps are Linux's")


def _advised(t: torch.Tensor) -> bool:
    """Whether the 2 MiB-aligned interior of ``t`` lies in a mapping with the ``hg`` flag."""
    addr = -(-t.data_ptr() // host_memory.HUGE_PAGE) * host_memory.HUGE_PAGE
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    return False


def test_weights_and_state_buffers_are_advised():
    # 51 MB per buffer: above glibc's largest mmap threshold (32 MB), so each is a fresh
    # mapping that no earlier advice in this process can have flagged
    k = AdaptiveTBE([TableSpec("t", 200_000, 64)], tra.AdamAR.rule_config(lr=0.01))
    assert _advised(k.weights)
    assert _advised(k.state_momentum1) and _advised(k.state_exp_avg_sq)


def test_small_or_disabled_buffers_are_left_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(host_memory, "_MADVISE", lambda *a: calls.append(a) or 0)
    host_memory.empty(1000, device=torch.device("cpu"))
    assert calls == []  # under 4 MiB: not worth a huge page
    host_memory.empty(4 << 20, device=torch.device("cpu"))
    assert len(calls) == 1 and calls[0][2] == host_memory.MADV_HUGEPAGE
    monkeypatch.setenv(host_memory.ENV, "0")
    host_memory.empty(4 << 20, device=torch.device("cpu"))
    assert len(calls) == 1
