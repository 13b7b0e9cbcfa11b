"""Runs the known chains through compiled CPU loops (``csrc/fused_rows_cpu.cpp``).

STYLE.md's rule: the kernel compiles known chains into one fused update and
runs anything else through the eager chain. Recognized: history and FAL (per-row,
run eagerly on [U] vectors), any row decays (folded into one per-row ``keep``
factor), then Adam or row-wise Adagrad (+ coupled L2) and the final update, which
one C++ loop applies in place on the full buffers: each touched row of the
weights and of its state is read and written once, with no gather or scatter.
The lookups are grouped by row in C++ too (one radix pass, into reused buffers).

Which build runs: one per instruction set (``cpu_isa.py``), the one matching ATen's
CPU capability unless ``TORCHREC_ADAPTIVE_CPU_ISA`` asks for a lower one. Where it
comes from, first that works: the modules ``setup.py`` compiled at install
(``pip install --no-build-isolation -e .``, as ``scripts/bootstrap.sh`` does), if built
from the current source; else a build on first use with ``torch.utils.cpp_extension``
(about a minute, cached under ``TORCH_EXTENSIONS_DIR`` with the instruction set in
its name); else (no compiler, failed build) the eager chain, with a warning: same
results, a slower step. ``TORCHREC_ADAPTIVE_FUSED_CPU=0`` forces the eager chain.
"""

from __future__ import annotations

import importlib
import math
import os
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from ..rules.apply import RowUpdate
from ..rules.slot_names import ACCUMULATOR, COUNT, FIRST_MOMENT, LAST_STEP, SECOND_MOMENT
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
from . import cpu_isa

_lock = threading.Lock()
_modules: dict[str, ModuleType | None] = {}
_EAGER_COST = ("using the eager chain instead: the same results, but each CPU training step takes "
               "about 2-3x as long (docs/performance.md)")


def extension(isa: str | None = None) -> ModuleType | None:
    """The fused loops built for ``isa`` (default: ``cpu_isa.selected()``); None if
    disabled or unbuildable (then warned once). Raises ``ValueError`` for a
    ``TORCHREC_ADAPTIVE_CPU_ISA`` this CPU cannot run."""
    if os.environ.get("TORCHREC_ADAPTIVE_FUSED_CPU", "1") == "0":
        return None
    isa = isa or cpu_isa.selected()
    with _lock:
        if isa not in _modules:
            _modules[isa] = _prebuilt(isa) or _jit(isa)
    return _modules[isa]


def _prebuilt(isa: str) -> ModuleType | None:
    """The module compiled at install time, unless the source changed since."""
    try:
        mod = importlib.import_module(f"{__package__}.{cpu_isa.module_name(isa)}")
    except ImportError:
        return None
    return mod if getattr(mod, "source_hash", None) == cpu_isa.source_hash() else None


def _jit(isa: str) -> ModuleType | None:
    """Compile on first use (the fallback when nothing was built at install)."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        warnings.warn(
            f"torchrec_adaptive: the fused CPU loops were not built at install and no C++ compiler ({cxx!r}, "
            f"from $CXX) is here to build them now; {_EAGER_COST}. Install a compiler (e.g. g++) and "
            "reinstall with `pip install --no-build-isolation -e .`, or let the first run build them.",
            RuntimeWarning, stacklevel=4,
        )
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name=f"torchrec_adaptive{cpu_isa.module_name(isa)}", sources=[str(cpu_isa.SOURCE)],
                    extra_cflags=cpu_isa.cflags(isa), extra_ldflags=list(cpu_isa.LDFLAGS), verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure means "use the eager chain"
        warnings.warn(
            f"torchrec_adaptive: the fused CPU loops ({isa}) could not be built "
            f"({type(e).__name__}: {str(e)[:300]}); {_EAGER_COST}",
            RuntimeWarning, stacklevel=4,
        )
        return None


@dataclass(frozen=True)
class LookupGrad:
    """Each touched row's gradient, not yet summed: row u's lookups are
    ``bags[row_offsets[u]:row_offsets[u + 1]]`` (each adding ``weight[i] *
    bag_grads[bags[i]]``). The fused loops sum them per row in registers, so the
    coalesced [U, D] gradient is never materialized."""

    row_offsets: Tensor  # [U + 1] int64
    bags: Tensor  # [L] int64 (eager) or int32 (from the C++ pass)
    weight: Tensor | None  # [L] float32, None: 1
    bag_grads: Tensor  # [bags, D] float32, contiguous

    def materialize(self) -> Tensor:
        """The summed [U, D] gradient (what the eager chain consumes)."""
        return torch.nn.functional.embedding_bag(
            self.bags, self.bag_grads, self.row_offsets.to(self.bags.dtype), mode="sum",
            per_sample_weights=self.weight, include_last_offset=True,
        )


class CoalesceWorkspace:
    """The buffers ``coalesce_lookups`` fills, reused from step to step (grown in C++):
    a fresh multi-MB tensor per step costs page faults on CPU (docs/performance.md).
    What one call returns are views into them, valid until the next call."""

    _DTYPES = (torch.int64, torch.int64, torch.int32, torch.int32, torch.int32, torch.float32, torch.int32,
               torch.float32)

    def __init__(self) -> None:
        self.buffers = [torch.empty(0, dtype=d) for d in self._DTYPES]


@dataclass(frozen=True)
class FusedChain:
    """A chain split into its eager per-row part and its fused [U, D] part, with the
    compiled loops (``ext``) that run it and their reused buffers."""

    row_transforms: tuple[RowTransform, ...]
    keep_transforms: tuple[Any, ...]
    base: scale_by_row_adam | scale_by_rowwise_adagrad  # row-wise RMSprop included (a subclass)
    l2: add_l2_to_row_grad | None
    ext: Any = None
    workspaces: dict[str, CoalesceWorkspace] = field(default_factory=dict, compare=False, repr=False)
    saved: dict[int, Tensor] = field(default_factory=dict, compare=False, repr=False)  # Helen's original rows
    scratch: dict[str, Tensor] = field(default_factory=dict, compare=False, repr=False)  # per-row results, reused

    @staticmethod
    def plan(chain: RowChain, ext: ModuleType | None = None) -> FusedChain | None:
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
        return FusedChain(tuple(rows), tuple(keeps), base, l2, ext)

    @property
    def isa(self) -> str:
        """The instruction-set variant of the loops in use (``cpu_isa.VARIANTS``)."""
        return str(self.ext.isa)

    def coalesce(self, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None, pooling: str,
                 num_rows: int, bag_grads: Tensor, buffers: str = "update") -> tuple[Tensor, Tensor, LookupGrad]:
        """One dim group's lookups grouped by row, in one C++ pass (what
        ``AdaptiveTBE._sorted_lookups`` computes with torch ops):
        unique rows [U], their occurrence counts [U] (float32) and their lookups.
        The results live in the ``buffers`` workspace until its next use."""
        ws = self.workspaces.setdefault(buffers, CoalesceWorkspace())
        psw = per_sample_weights.float().contiguous() if per_sample_weights is not None else _EMPTY
        rows, occ, row_offsets, bags, weight = self.ext.coalesce_lookups(
            indices.long().contiguous(), offsets.long().contiguous(), psw, pooling == "mean", num_rows, ws.buffers)
        grad = LookupGrad(row_offsets, bags, weight if weight.numel() else None, bag_grads.float().contiguous())
        return rows, occ, grad

    def update(
        self, weight: Tensor, state: dict[str, Tensor], upd: RowUpdate, grad: LookupGrad, step: int, epoch: int,
    ) -> None:
        """Same effect as ``rules.apply.update_rows`` with the full chain (tested).

        ``upd.grad`` is not read: the loops sum ``grad`` per row themselves.
        """
        if upd.rows.numel() == 0:
            return
        ext = self.ext
        rows = upd.rows
        batch = RowBatch(rows=rows, weight=weight, grad=upd.grad, lr=upd.lr, occurrences=upd.occurrences,
                         step=step, epoch=epoch, table=upd.table, base_lr=upd.base_lr)
        for t in self.row_transforms:
            if isinstance(t, track_row_history) and t.half_life == 0:
                self._row_history(state, batch)
                continue
            own = {s.name: state[s.name].index_select(0, rows) for s in t.slots()}
            for name, value in t.update(batch, own).items():
                state[name].index_copy_(0, rows, value.to(state[name].dtype))
        keep: Tensor | None = None
        for t in self.keep_transforms:
            k = t.row_keep(batch)
            if k is not None:
                keep = k if keep is None else keep * k
        keep_arg = keep.float().contiguous() if keep is not None else _EMPTY
        lr = batch.lr.reshape(-1).float()
        lookups = (rows, grad.row_offsets, grad.bags, grad.weight if grad.weight is not None else _EMPTY,
                   grad.bag_grads)
        if isinstance(self.base, scale_by_row_adam):
            b = self.base
            ext.adam_rows_(weight, state[FIRST_MOMENT], state[SECOND_MOMENT], *lookups, lr, keep_arg,
                           b.beta1, b.beta2, b.eps, 1.0 - b.beta1**step, math.sqrt(1.0 - b.beta2**step))
        else:
            l2 = self.l2.weight_decay if self.l2 is not None else 0.0
            # one row-wise loop: Adagrad accumulates (1, 1), RMSprop averages (beta, 1 - beta)
            ext.rowwise_adagrad_rows_(weight, state[ACCUMULATOR], *lookups, lr, keep_arg, self.base.eps, l2,
                                      *self.base.accumulation())

    def _row_history(self, state: dict[str, Tensor], batch: RowBatch) -> None:
        """``track_row_history`` (no half-life) in one C++ pass over the touched rows, in
        place: the same s_r, c_r and published ``skipped``/``count`` as its eager update
        (tested), without the gathers, [U] temporaries and scatters."""
        n = batch.rows.numel()
        skipped = self._scratch("skipped", n, torch.int64)
        count = self._scratch("count", n, torch.float64)
        self.ext.row_history_(state[LAST_STEP], state[COUNT], batch.rows, batch.occurrences.float().contiguous(),
                              batch.step, skipped, count)
        batch.extras["skipped"] = skipped
        batch.extras["count"] = count

    def _scratch(self, name: str, n: int, dtype: torch.dtype) -> Tensor:
        """A reused [n] buffer (valid until the next step's use): fresh multi-MB tensors
        cost page faults on CPU (docs/performance.md)."""
        buf = self.scratch.get(name)
        if buf is None or buf.numel() < n:
            buf = self.scratch[name] = torch.empty(n + n // 4, dtype=dtype)
        return buf[:n]

    def row_norms(self, rows: Tensor, grad: LookupGrad, out: Tensor) -> Tensor:
        """||g_r|| [U] of each row (Helen's capture), writing g_r into ``out`` [U, D]."""
        return self.ext.row_grad_norms(rows, grad.row_offsets, grad.bags,
                                       grad.weight if grad.weight is not None else _EMPTY, grad.bag_grads, out)

    def perturb(self, weight: Tensor, rows: Tensor, grad: Tensor, scale: Tensor, group: int) -> Tensor:
        """w_r += scale_r g_r in place (Helen; ``grad`` [U, D]); returns the rows' original values,
        held in a buffer reused at the group's next perturbation (restored before it)."""
        n = rows.numel() * weight.shape[1]
        if self.saved.get(group, _EMPTY).numel() < n:
            self.saved[group] = torch.empty(n + n // 4)
        values = self.saved[group][:n].view(rows.numel(), weight.shape[1])
        self.ext.perturb_rows_(weight, rows, grad, scale.float().contiguous(), values)
        return values

    def restore(self, weight: Tensor, rows: Tensor, values: Tensor) -> None:
        """w_r <- the saved original rows (Helen's restore, bit-exact)."""
        self.ext.restore_rows_(weight, rows, values)


_EMPTY = torch.empty(0)


@dataclass(frozen=True)
class PreparedLookups:
    """What ``prepare_lookups`` made of one batch: per dim group its (block rows, bag
    offsets, bag lengths, per-sample weights or None), and what the checks found:
    ``offsets`` = (first, last) or (bag,) of bad offsets, ``bad_ids`` = (feature, ID, count)
    of out-of-range IDs (first in input order), both None when fine."""

    groups: list[tuple[Tensor, Tensor, Tensor, Tensor | None]]
    offsets: tuple[int, ...] | None
    bad_ids: tuple[int, int, int] | None


def prepare_lookups(ext: Any, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None,
                    feature_rows: Tensor, feature_row_offset: Tensor, group_features: list[Tensor],
                    batch_major: bool, bounds: bool) -> PreparedLookups:
    """The forward's offset and ID checks, block-row shift and bag reorder in one C++ pass
    (``prepare_lookups`` in csrc/fused_rows_cpu.cpp; ``AdaptiveTBE.forward`` does the same
    with torch ops on other devices). IDs out of range come back clamped into range."""
    psw = per_sample_weights.float().contiguous() if per_sample_weights is not None else _EMPTY
    out = ext.prepare_lookups(indices.long().contiguous(), offsets.long().contiguous(), psw, feature_rows,
                              feature_row_offset, group_features, batch_major, bounds)
    kind, a, b, c, d = out[-1].tolist()
    if kind in (1, 2):
        return PreparedLookups([], (a, b) if kind == 1 else (a,), None)
    groups = [(out[i], out[i + 1], out[i + 2], out[i + 3] if per_sample_weights is not None else None)
              for i in range(0, len(out) - 1, 4)]
    return PreparedLookups(groups, None, (b, c, d) if kind == 3 else None)


def fused_for(chain: RowChain, device: torch.device, dtype: torch.dtype) -> FusedChain | None:
    """The fused form to use for a kernel on ``device``, or None for the eager chain.

    Raises ``ValueError`` if ``TORCHREC_ADAPTIVE_CPU_ISA`` names a variant this CPU cannot run."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    plan = FusedChain.plan(chain)
    if plan is None:
        return None
    ext = extension()
    return FusedChain.plan(chain, ext) if ext is not None else None
