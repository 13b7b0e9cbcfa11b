"""Helen's frequency-wise sharpness-aware perturbation of touched rows (seeds/helen_*).

The two-pass step needs three things from a fused kernel, all on touched rows
only and never on a dense table gradient: capture a backward's coalesced row
gradients without updating, perturb those rows by
eps_r = rho_r g_r / ||g_r||, rho_r = rho max(c_r / max_t c, xi), and put the exact
original rows back before the next update. Restoring from a saved copy (not by
subtracting eps) leaves no floating-point residue of eps.

On CPU the fused loops do each in one pass over the touched rows: the capture sums
g_r from the lookups into a reused [U, D] buffer and takes its norm
(``fused_cpu.FusedChain.row_norms``; keeping g_r, not the lookups, frees the larger
[bags, D] output gradient with the backward, and the perturbation then reads g_r in
order), one pass saves each row into a reused buffer and adds scale_r g_r in place
(``FusedChain.perturb``), and one copies the saved rows back
(``FusedChain.restore``); the eager path (other devices) uses torch ops.

Per-step work stays proportional to the batch, not to the tables: the captured rows
are sorted, so each table's rows are one contiguous segment (no per-row table
lookup); max_t c comes from a running per-table maximum of the stored counts
(:class:`CountPeaks`), not from a scan of every table's counts; and the second pass,
which looks up the same batch, reuses the capture's grouping of lookups by row
(:class:`CapturedGrouping`) once its lookups are checked equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..rules.base import RowChain
from ..rules.transforms import track_row_history
from .fused_cpu import LookupGrad


@dataclass
class CapturedRows:
    """One dim group's touched rows from a captured backward."""

    group: int
    rows: Tensor  # [U] rows within the group's block, ascending
    counts: Tensor  # [U] c_r after this batch (stored count + occurrences)
    tables: Tensor  # [T_g] kernel table index of each of the group's tables, in row order
    table_rows: Tensor  # [T_g] how many of ``rows`` fall in each of those tables (rows sorted: segments)
    norm: Tensor  # [U] ||g_r|| of the coalesced gradient
    grad: Tensor  # [U, D] the coalesced gradient g_r (CPU loops: in a buffer reused at the next capture)

    def table_peaks(self) -> Tensor:
        """max c_r over the captured rows of each of ``tables`` [T_g] (0 where none)."""
        return torch.segment_reduce(self.counts, "max", lengths=self.table_rows, unsafe=True, initial=0)


def counts_only_grow(chain: RowChain) -> bool:
    """c_r <- c_r + occ (no half-life): an update never lowers a table's max count."""
    return all(t.half_life == 0 for t in chain.transforms if isinstance(t, track_row_history))


def reused_rows(store: dict[int, Tensor], key: int, n: int, d: int) -> Tensor:
    """A [n, d] float32 view of ``store[key]``, grown (never shrunk) and kept: a fresh
    multi-MB tensor per step costs its page faults on CPU."""
    if key not in store or store[key].numel() < n * d:
        store[key] = torch.empty(n * d + n * d // 4)
    return store[key][: n * d].view(n, d)


def table_segments(rows: Tensor, table_row_starts: Tensor) -> Tensor:
    """How many of the ascending ``rows`` fall in each table, the tables starting at
    ``table_row_starts`` (ascending, the first 0): [T_g], a search per table, not per row."""
    starts = torch.searchsorted(rows, table_row_starts)
    ends = torch.cat([starts[1:], starts.new_full((1,), rows.numel())])
    return ends - starts


def row_scale(cap: CapturedRows, rho: float, xi: float, max_count: Tensor) -> Tensor:
    """rho_r / ||g_r|| [U] (0 where g_r = 0), so eps_r = scale_r g_r; ``max_count`` [T] is
    max c_r per table (all shards)."""
    peak = max_count[cap.tables].to(cap.counts.dtype)
    inv_peak = torch.where(peak > 0, 1.0 / peak.clamp(min=1e-30), torch.zeros_like(peak))  # per table: [T_g] ops
    ratio = cap.counts * torch.repeat_interleave(inv_peak, cap.table_rows, output_size=cap.rows.numel())
    rho_r = (rho * torch.clamp(ratio, min=xi)).to(cap.norm.dtype)
    return torch.where(cap.norm > 0, rho_r / cap.norm, torch.zeros_like(rho_r))  # g_r = 0: no perturbation


@dataclass
class SavedRows:
    """Original values of perturbed rows, to write back bit-exactly."""

    weight: Tensor  # the [R, D] block view
    rows: Tensor
    values: Tensor
    fused: Any = None  # fused_cpu.FusedChain: its loops copy the rows back (faster than index_copy_)

    def restore(self) -> None:
        if self.fused is not None:
            self.fused.restore(self.weight, self.rows, self.values)
        else:
            self.weight.index_copy_(0, self.rows, self.values)


@dataclass
class CapturedGrouping:
    """A captured pass's lookups of one dim group and their grouping by row, for the
    second pass to reuse when it looks up the same batch (Helen's does): the grouping
    depends on the lookups only, never on the weights or the gradients.

    ``matches`` compares the lookups by value (indices, bags, per-sample weights): a
    different batch, or the same IDs with other weights, is grouped afresh. The captured
    lookups are copies, so a forward that refills its buffers cannot make them match."""

    indices: Tensor
    offsets: Tensor
    per_sample_weights: Tensor | None
    rows: Tensor
    occurrences: Tensor
    row_offsets: Tensor  # LookupGrad's, without the captured pass's bag gradients (not kept alive)
    bags: Tensor
    weight: Tensor | None

    def matches(self, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None) -> bool:
        if (per_sample_weights is None) != (self.per_sample_weights is None):
            return False
        return (torch.equal(indices, self.indices) and torch.equal(offsets, self.offsets)
                and (per_sample_weights is None or torch.equal(per_sample_weights, self.per_sample_weights)))

    @staticmethod
    def of(indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None, rows: Tensor, occurrences: Tensor,
           grad: LookupGrad) -> "CapturedGrouping":
        return CapturedGrouping(indices.clone(), offsets.clone(),
                                per_sample_weights.clone() if per_sample_weights is not None else None,
                                rows, occurrences, grad.row_offsets, grad.bags, grad.weight)

    def with_bag_grads(self, bag_grads: Tensor, dtype: torch.dtype) -> LookupGrad:
        return LookupGrad(self.row_offsets, self.bags, self.weight, bag_grads.to(dtype).contiguous())


def buffer_version(t: Tensor) -> int:
    """PyTorch's counter of in-place writes to ``t``'s storage (``Tensor._version``, what
    autograd checks saved tensors with). A private attribute, used here only: no public
    API tells whether a tensor was written since a given moment. Canary:
    tests/kernels/test_helen_caches.py (in-place ops on the tensor or a view bump it)."""
    return t._version


class CountPeaks:
    """max c_r of each kernel table over its stored counts, kept up to date instead of
    scanned: a scan reads every row of every table each step (O(table rows)), while
    Helen's step otherwise costs O(batch).

    Valid while the count buffer is the same tensor at the same autograd version (every
    in-place torch op on it or a view of it bumps the version: a checkpoint load, MEDA's
    ``reinit_rows``, a user's write through ``get_optimizer_state``); then the kernel
    folds in the new counts of the rows each update touched (:meth:`fold`), which is
    exact while counts only grow (and covers updates whose C++ or Triton loops write the
    counts without bumping the version). Otherwise the next :meth:`get` scans once more.
    Other writes the version does not see (Triton kernels, ``.data``) must call
    :meth:`invalidate`.
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self._seen = -1
        self._peaks: Tensor | None = None  # [T], the buffer's dtype and device

    def invalidate(self) -> None:
        self._buffer, self._peaks = None, None

    def valid_for(self, buffer: Tensor) -> bool:
        return self._peaks is not None and self._buffer is buffer and self._seen == buffer_version(buffer)

    def get(self, buffer: Tensor, row_start: list[int], num_rows: list[int]) -> Tensor:
        """[T] per-table max of ``buffer`` (tables at ``row_start`` with ``num_rows``); scans
        only when the cached values are not known to be current."""
        if not self.valid_for(buffer):
            self._peaks = torch.stack([buffer[a : a + n].max() if n else buffer.new_zeros(())
                                       for a, n in zip(row_start, num_rows)])
            self._buffer, self._seen = buffer, buffer_version(buffer)
        assert self._peaks is not None
        return self._peaks

    def fold(self, buffer: Tensor, version_before: int, tables: Tensor, peaks: Tensor) -> None:
        """An update that found the cache current (at ``version_before``) raised the
        counts of some rows to at most ``peaks`` per table of ``tables``: fold them in."""
        if self._peaks is None or self._buffer is not buffer or self._seen != version_before:
            self.invalidate()
            return
        self._peaks[tables] = torch.maximum(self._peaks[tables], peaks.to(self._peaks.dtype))
        self._seen = buffer_version(buffer)
