"""Runs the known chains through compiled CPU loops (``csrc/fused_rows_cpu.cpp``).

STYLE.md's rule: the kernel compiles known chains into one fused update and
runs anything else through the eager chain. Recognized: history and FAL (per-row,
run eagerly on [U] vectors), any row decays (folded into one per-row ``keep``
factor), then Adam or row-wise Adagrad (+ coupled L2) and the final update, which
one C++ loop applies in place on the full buffers: each touched row of the
weights and of its state is read and written once, with no gather or scatter.

The extension is compiled on first use with ``torch.utils.cpp_extension`` (about
a minute, cached under ``TORCH_EXTENSIONS_DIR``). If that fails (no compiler),
the kernel warns once and uses the eager chain, which computes the same update.
Set ``TORCHREC_ADAPTIVE_FUSED_CPU=0`` to force the eager chain.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ..rules.apply import RowUpdate
from ..rules.base import RowBatch, RowChain, RowTransform
from ..rules.transforms import (
    add_adaptive_row_decay,
    add_decoupled_row_decay,
    add_l2_to_row_grad,
    admit_by_count,
    apply_row_update,
    scale_by_row_adam,
    scale_by_row_frequency,
    scale_by_rowwise_adagrad,
    track_row_history,
)

_SOURCE = Path(__file__).parent / "csrc" / "fused_rows_cpu.cpp"
_lock = threading.Lock()
_extension: ModuleType | None = None
_failed: str | None = None


def extension() -> ModuleType | None:
    """The compiled extension, built on first call; None if disabled or unbuildable."""
    global _extension, _failed
    if os.environ.get("TORCHREC_ADAPTIVE_FUSED_CPU", "1") == "0":
        return None
    with _lock:
        if _extension is None and _failed is None:
            try:
                from torch.utils.cpp_extension import load

                _extension = load(
                    name="torchrec_adaptive_fused_rows_cpu",
                    sources=[str(_SOURCE)],
                    extra_cflags=["-O3", "-fopenmp", "-fno-math-errno"],
                    extra_ldflags=["-fopenmp"],
                    verbose=False,
                )
            except Exception as e:  # noqa: BLE001 - any build failure means "use the eager chain"
                _failed = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"torchrec_adaptive: the fused CPU update could not be built ({_failed[:300]}); "
                    "using the eager chain (same results, slower)",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _extension


@dataclass(frozen=True)
class LookupGrad:
    """Each touched row's gradient, not yet summed: row u's lookups are
    ``bags[row_offsets[u]:row_offsets[u + 1]]`` (each adding ``weight[i] *
    bag_grads[bags[i]]``). The fused loops sum them per row in registers, so the
    coalesced [U, D] gradient is never materialized."""

    row_offsets: Tensor  # [U + 1] int64
    bags: Tensor  # [L] int64
    weight: Tensor | None  # [L] float32, None: 1
    bag_grads: Tensor  # [bags, D] float32, contiguous

    def materialize(self) -> Tensor:
        """The summed [U, D] gradient (what the eager chain consumes)."""
        return torch.nn.functional.embedding_bag(
            self.bags, self.bag_grads, self.row_offsets, mode="sum",
            per_sample_weights=self.weight, include_last_offset=True,
        )


@dataclass(frozen=True)
class FusedChain:
    """A chain split into its eager per-row part and its fused [U, D] part."""

    row_transforms: tuple[RowTransform, ...]
    keep_transforms: tuple[Any, ...]
    base: scale_by_row_adam | scale_by_rowwise_adagrad  # row-wise RMSprop included (a subclass)
    l2: add_l2_to_row_grad | None

    @staticmethod
    def plan(chain: RowChain) -> FusedChain | None:
        """The fused form of ``chain``, or None when it has a transform the loops don't know."""
        ts = chain.transforms
        if len(ts) < 2 or not isinstance(ts[-1], apply_row_update):
            return None
        base = ts[-2]
        if not isinstance(base, (scale_by_row_adam, scale_by_rowwise_adagrad)):
            return None
        rows: list[RowTransform] = []
        keeps: list[Any] = []
        l2 = None
        for t in ts[:-2]:
            # admission only zeroes lr_r and marks rows (the decays' row_keep honour it): eager, like FAL
            if isinstance(t, (track_row_history, admit_by_count, scale_by_row_frequency)) and not keeps and l2 is None:
                rows.append(t)
            elif isinstance(t, (add_adaptive_row_decay, add_decoupled_row_decay)):
                keeps.append(t)
            elif isinstance(t, add_l2_to_row_grad) and isinstance(base, scale_by_rowwise_adagrad) and l2 is None:
                l2 = t
            else:
                return None
        return FusedChain(tuple(rows), tuple(keeps), base, l2)

    def update(
        self, ext: ModuleType, weight: Tensor, state: dict[str, Tensor], upd: RowUpdate, grad: LookupGrad,
        step: int, epoch: int,
    ) -> None:
        """Same effect as ``rules.apply.update_rows`` with the full chain (tested).

        ``upd.grad`` is not read: the loops sum ``grad`` per row themselves.
        """
        if upd.rows.numel() == 0:
            return
        rows = upd.rows
        batch = RowBatch(rows=rows, weight=weight, grad=upd.grad, lr=upd.lr, occurrences=upd.occurrences,
                         step=step, epoch=epoch, table=upd.table, base_lr=upd.base_lr)
        for t in self.row_transforms:
            own = {s.name: state[s.name].index_select(0, rows) for s in t.slots()}
            for name, value in t.update(batch, own).items():
                state[name].index_copy_(0, rows, value.to(state[name].dtype))
        keep: Tensor | None = None
        for t in self.keep_transforms:
            k = t.row_keep(batch)
            if k is not None:
                keep = k if keep is None else keep * k
        keep_arg = keep.float().contiguous() if keep is not None else torch.empty(0)
        lr = batch.lr.reshape(-1).float()
        lookups = (rows, grad.row_offsets, grad.bags,
                   grad.weight.float().contiguous() if grad.weight is not None else torch.empty(0),
                   grad.bag_grads.float().contiguous())
        if isinstance(self.base, scale_by_row_adam):
            b = self.base
            ext.adam_rows_(weight, state["exp_avg"], state["exp_avg_sq"], *lookups, lr, keep_arg,
                           b.beta1, b.beta2, b.eps, 1.0 - b.beta1**step, math.sqrt(1.0 - b.beta2**step))
        else:
            l2 = self.l2.weight_decay if self.l2 is not None else 0.0
            # one row-wise loop: Adagrad accumulates (1, 1), RMSprop averages (beta, 1 - beta)
            ext.rowwise_adagrad_rows_(weight, state["momentum"], *lookups, lr, keep_arg, self.base.eps, l2,
                                      *self.base.accumulation())


def fused_for(chain: RowChain, device: torch.device, dtype: torch.dtype) -> FusedChain | None:
    """The fused form to use for a kernel on ``device``, or None for the eager chain."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    plan = FusedChain.plan(chain)
    if plan is None or extension() is None:
        return None
    return plan
