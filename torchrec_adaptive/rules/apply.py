"""Gather, run a chain, scatter: the one place where rows meet their storage.

Both the fused kernel (per group of equal-dim tables) and the unsharded
``torch.optim`` front ends call :func:`update_rows`, so the rule is written once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import RowBatch, RowChain, StateSlot


def allocate_row_state(slots: tuple[StateSlot, ...], num_rows: int, dim: int, device: torch.device | None) -> dict[str, Tensor]:
    """Storage for every slot of a chain: [num_rows] or [num_rows, dim]."""
    out: dict[str, Tensor] = {}
    for s in slots:
        shape = (num_rows, dim) if s.per_element else (num_rows,)
        out[s.name] = torch.full(shape, s.init, dtype=s.dtype, device=device)
    return out


class Workspace:
    """Reusable scratch tensors, grown to the largest step seen.

    Every step gathers a different number of rows; on CPU each fresh multi-MB
    tensor costs page faults that took as long as the arithmetic (measured in
    benchmarks/kernel_step.py), so gathers and temporaries reuse these buffers.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        n = 1
        for d in shape:
            n *= d
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(max(n, 2 * buf.numel() if buf is not None else n), dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:n].view(shape)


@dataclass(frozen=True)
class RowUpdate:
    """The coalesced rows of one step for one storage block."""

    rows: Tensor  # [U] int64, unique
    grad: Tensor  # [U, D]
    occurrences: Tensor  # [U] float32
    lr: Tensor  # [U, 1]
    table: Tensor | None = None  # [U]
    base_lr: float | None = None  # the optimizer's lr before kappa and FAL (RowBatch.base_lr)


def _gather(ws: Workspace | None, name: str, buf: Tensor, rows: Tensor) -> Tensor:
    if ws is None:
        return buf.index_select(0, rows)
    out = ws.get(name, (rows.numel(), *buf.shape[1:]), buf.dtype, buf.device)
    return torch.index_select(buf, 0, rows, out=out)


def update_rows(
    chain: RowChain, weight: Tensor, state: dict[str, Tensor], upd: RowUpdate, step: int, epoch: int,
    workspace: Workspace | None = None,
) -> None:
    """Apply ``chain`` to the rows ``upd.rows`` of ``weight`` [R, D] and ``state`` in place."""
    if upd.rows.numel() == 0:
        return
    rows = upd.rows
    batch = RowBatch(
        rows=rows,
        weight=_gather(workspace, "weight", weight, rows),
        grad=upd.grad,
        lr=upd.lr,
        occurrences=upd.occurrences,
        step=step,
        epoch=epoch,
        table=upd.table,
        base_lr=upd.base_lr,
        workspace=workspace,
    )
    gathered = {name: _gather(workspace, name, buf, rows) for name, buf in state.items()}
    new_state = chain.update(batch, gathered)
    weight.index_copy_(0, rows, batch.weight.to(weight.dtype))
    for name, value in new_state.items():
        state[name].index_copy_(0, rows, value.to(state[name].dtype))
