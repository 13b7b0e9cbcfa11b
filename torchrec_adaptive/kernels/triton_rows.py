"""The fused backward + update of the touched rows in Triton: the GPU twin of
``csrc/fused_rows_cpu.cpp`` (same arithmetic, same split between per-row factors and
the [U, D] loop), with no host synchronization anywhere in a step.

Why Triton: on CUDA the eager chain is ~30 small torch ops per dim group and step
(gather, ~8 elementwise passes, scatter), and ``torch.unique_consecutive`` plus the
checks force the host to wait for the device. Each Triton program takes a block of
touched rows, sums each row's lookups' bag gradients in registers and applies the rule
in place on the weights and state, so each touched row is read and written once, as
FBGEMM's TBE does.
FBGEMM's fused optimizers are a fixed, code-generated list (no AdamAR, no FAL), so
they cannot run these rules.

How the sizes stay on the device (FBGEMM's layout): the lookups are sorted by row and
cut into segments, one per distinct row, in buffers sized by the number of lookups L
(an upper bound of the distinct rows U). ``n_valid`` -- the number of real segments --
is a 0-d device tensor that every kernel reads itself; programs past it do nothing.
Lookups that must not train anything (a bad ID, see ``inputs.DeviceChecks``) carry the
row id ``sentinel`` (>= every real row), so they sort into the segments past
``n_valid``. A step whose output gradient is non-finite sets ``n_valid`` to 0: nothing
changes, and the host never had to look.

Per-row factors are computed by the rule's own transforms (rules/transforms.py) on
[L]-sized vectors, planned exactly as for the CPU loops (:class:`fused_cpu.FusedChain`),
so a rule stays defined once; the new per-row state they return is stored by a masked
Triton store, because a torch scatter of the padded entries would collide with real rows.

On CPU tensors Triton runs only in its interpreter (``TRITON_INTERPRET=1``, set before
the first use of this module's kernels): that is how CI tests these kernels without a GPU.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ..rules.base import RowBatch, RowChain
from ..rules.transforms import scale_by_row_adam
from .fused_cpu import FusedChain

_STORE_BLOCK = 256
_INTERPRET_ROWS = 32


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(device: torch.device) -> str | None:
    """Why Triton cannot run on ``device`` here, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cpu" and not _interpreting():
        return "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1)"
    if device.type not in ("cpu", "cuda"):
        return f"Triton does not run on {device.type!r} tensors"
    return None


def kernels() -> ModuleType:
    """The jitted kernels, imported on first use (see triton_kernels.py)."""
    from . import triton_kernels

    return triton_kernels


@dataclass(frozen=True)
class Segments:
    """A dim group's lookups grouped by row, in buffers of the number of lookups L.

    Segment u < n_valid is row ``rows[u]`` with lookups ``row_offsets[u]:row_offsets[u+1]``
    of ``bags`` / ``weight``; the rest are padding (row ``sentinel`` or unused)."""

    rows: Tensor  # [L] int64, sorted; sentinel past the real rows
    row_offsets: Tensor  # [L + 1] int64
    bags: Tensor  # [L] int64, bag of each row-sorted lookup
    weight: Tensor | None  # [L] float32 per-lookup weight (per-sample weight, 1/len for MEAN), None: 1
    occurrences: Tensor  # [L] float32, lookups per segment
    n_valid: Tensor  # [1] int64 on the device: the real segments (0 masks the whole update)


def segment_lookups(rows: Tensor, bag_of_lookup: Tensor, weight: Tensor | None, sentinel: int) -> Segments:
    """Sort the lookups by row and cut them into per-row segments with no host sync
    (no ``unique``: segment ids are a cumulative sum of "row changed" flags)."""
    n = rows.numel()
    sorted_rows, perm = torch.sort(rows)
    change = torch.ones(n, dtype=torch.long, device=rows.device)
    change[1:] = sorted_rows[1:] != sorted_rows[:-1]
    seg = torch.cumsum(change, 0).sub_(1)
    uniq = torch.full((n,), sentinel, dtype=torch.long, device=rows.device).scatter_(0, seg, sorted_rows)
    counts = torch.zeros(n, dtype=torch.long, device=rows.device).scatter_add_(0, seg, torch.ones_like(seg))
    row_offsets = torch.zeros(n + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(counts, 0, out=row_offsets[1:])
    n_valid = (uniq < sentinel).sum().reshape(1)
    w = weight[perm].float().contiguous() if weight is not None else None
    return Segments(uniq, row_offsets, bag_of_lookup[perm].contiguous(), w, counts.to(torch.float32), n_valid)


class TritonChain:
    """A chain planned for the Triton kernels: the CPU loops' plan (``FusedChain.plan``:
    per-row transforms run eagerly, decays folded into one keep factor, then Adam or
    row-wise Adagrad/RMSprop with coupled L2), launched on the segment layout."""

    def __init__(self, plan: FusedChain) -> None:
        self.plan = plan

    @staticmethod
    def for_chain(chain: RowChain) -> "TritonChain | None":
        plan = FusedChain.plan(chain)
        return TritonChain(plan) if plan is not None else None

    def update(self, weight: Tensor, state: dict[str, Tensor], seg: Segments, bag_grads: Tensor, lr: Tensor,
               table: Tensor | None, base_lr: float, step: int, epoch: int) -> None:
        """Same effect as ``rules.apply.update_rows`` with the full chain on the real
        segments (tested); ``lr`` [L] is each segment's lr * kappa."""
        n = seg.rows.numel()
        if n == 0:
            return
        k = kernels()
        valid_rows = torch.where(torch.arange(n, device=seg.rows.device) < seg.n_valid, seg.rows, 0)
        none = weight.new_empty(0)  # the per-row transforms read neither rows nor gradients; the kernels do
        batch = RowBatch(rows=valid_rows, weight=none, grad=none, lr=lr.reshape(n, 1), occurrences=seg.occurrences,
                         step=step, epoch=epoch, table=table, base_lr=base_lr)
        grid_store = (triton_cdiv(n, _STORE_BLOCK),)
        for t in self.plan.row_transforms:
            own = {s.name: state[s.name].index_select(0, valid_rows) for s in t.slots()}
            for name, value in t.update(batch, own).items():
                k.store_rows[grid_store](state[name], seg.rows, value.to(state[name].dtype).contiguous(), seg.n_valid,
                                         BLOCK=_STORE_BLOCK)
        keep: Tensor | None = None
        for t in self.plan.keep_transforms:
            f = t.row_keep(batch)
            if f is not None:
                keep = f if keep is None else keep * f
        d = weight.shape[1]
        block_d = max(16, 1 << (d - 1).bit_length())
        # rows per program: ~2K elements a program on a GPU; the interpreter pays per program, so more there
        block_r = max(1, min(_INTERPRET_ROWS if _interpreting() else 2048 // block_d, 64))
        common: dict[str, Any] = dict(HAS_LW=seg.weight is not None, HAS_KEEP=keep is not None,
                                      BLOCK_R=block_r, BLOCK_D=block_d)
        grid = (triton_cdiv(n, block_r),)
        lookups = (seg.rows, seg.row_offsets, seg.bags, seg.weight if seg.weight is not None else seg.occurrences,
                   bag_grads.float().contiguous(), batch.lr.reshape(-1).float().contiguous(),
                   keep.float().contiguous() if keep is not None else seg.occurrences, seg.n_valid, d)
        base = self.plan.base
        own = [state[slot.name] for slot in base.slots()]  # Adam's two moments or the row-wise accumulator
        if isinstance(base, scale_by_row_adam):
            k.adam_rows[grid](weight, *own, *lookups, 1.0 - base.beta1, base.beta2, 1.0 - base.beta2, base.eps,
                              1.0 / (1.0 - base.beta1**step), 1.0 / math.sqrt(1.0 - base.beta2**step), **common)
        else:
            l2 = self.plan.l2.weight_decay if self.plan.l2 is not None else 0.0
            k.rowwise_adagrad_rows[grid](weight, *own, *lookups, base.eps, l2, *base.accumulation(),
                                         **common)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b
