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
    k = AdaptiveTBE([TableSpec("t", 40_000, 64)], tra.AdamAR.rule_config(lr=0.01))  # 10 MB per buffer
    assert _advised(k.weights)
    assert _advised(k.state_momentum1) and _advised(k.state_exp_avg_sq)


def test_small_or_disabled_buffers_are_left_alone(monkeypatch):
    small = host_memory.empty(1000, device=torch.device("cpu"))
    assert not _advised(small)
    monkeypatch.setenv(host_memory.ENV, "0")
    big = host_memory.empty(4 << 20, device=torch.device("cpu"))
    assert not _advised(big)
