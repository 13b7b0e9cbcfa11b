"""Helen's frequency-wise sharpness-aware perturbation of touched rows (seeds/helen_*).

The two-pass step needs three things from a fused kernel, all on touched rows
only and never on a dense table gradient: capture a backward's coalesced row
gradients without updating, perturb those rows by
eps_r = rho_r g_r / ||g_r||, rho_r = rho max(c_r / max_t c, xi), and put the exact
original rows back before the next update. Restoring from a saved copy (not by
subtracting eps) leaves no floating-point residue of eps.

On CPU the fused loops do it without a [U, D] gradient: the capture keeps the
row-sorted lookups and each row's norm (``fused_cpu.FusedChain.row_norms``), and one
pass per row saves it into a reused buffer and adds scale_r g_r in place
(``FusedChain.perturb``); the eager path (other devices) materializes g_r.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .fused_cpu import LookupGrad


@dataclass
class CapturedRows:
    """One dim group's touched rows from a captured backward.

    The fused CPU path keeps only each row's lookups (``grad``, summed again when
    perturbing) and ``norm``; the eager path also keeps the summed ``dense`` [U, D]."""

    group: int
    rows: Tensor  # [U] rows within the group's block
    counts: Tensor  # [U] c_r after this batch (stored count + occurrences)
    table: Tensor  # [U] kernel table index of each row
    norm: Tensor  # [U] ||g_r|| of the coalesced gradient
    grad: LookupGrad  # the row-sorted lookups g_r sums
    dense: Tensor | None = None  # [U, D] coalesced gradient, when materialized


def row_scale(cap: CapturedRows, rho: float, xi: float, max_count: Tensor) -> Tensor:
    """rho_r / ||g_r|| [U] (0 where g_r = 0), so eps_r = scale_r g_r; ``max_count`` [T] is
    max c_r per table (all shards)."""
    peak = max_count[cap.table].to(cap.counts.dtype)
    ratio = torch.where(peak > 0, cap.counts / peak.clamp(min=1e-30), torch.zeros_like(cap.counts))
    rho_r = rho * torch.clamp(ratio, min=xi)
    norm = cap.norm
    return torch.where(norm > 0, rho_r / norm.clamp(min=1e-30), torch.zeros_like(norm)).to(norm.dtype)


@dataclass
class SavedRows:
    """Original values of perturbed rows, to write back bit-exactly."""

    weight: Tensor  # the [R, D] block view
    rows: Tensor
    values: Tensor

    def restore(self) -> None:
        self.weight.index_copy_(0, self.rows, self.values)
