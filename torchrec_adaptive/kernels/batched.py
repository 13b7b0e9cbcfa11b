"""``BatchedAdaptiveEmbeddingBag``: a table-batched embedding bag whose backward
applies the optimizer in place on the touched rows ("fused", as FBGEMM's TBE).

Why our own kernel: FBGEMM's fused optimizers are a fixed, code-generated list
(and its fused Adam refuses to run on CPU), so AdamAR, FAL and the rest cannot be
added to it. The module mirrors the public surface of FBGEMM's
``SplitTableBatchedEmbeddingBagsCodegen`` (``split_embedding_weights``,
``get_optimizer_state``, ``get/set_learning_rate``, ``set_optimizer_step``,
``update_hyper_parameters``, ``flush``) so TorchRec can wrap it like FBGEMM's.

How backward stays sparse: the coalesced gradient of each touched row is itself an
embedding bag over the pooled-output gradients (row r's gradient is the weighted
sum of the gradients of the bags that contain r). After sorting the lookups by
row, one ``embedding_bag`` call on the output gradient computes all of them, so
no dense table gradient and no per-lookup ``[L, D]`` tensor is ever built.
Everything is device-agnostic torch ops: the same code runs on CPU and CUDA.

Non-finite gradients (``nonfinite``): a step whose output gradient has a NaN/Inf is
refused inside backward by updating nothing (weights and row state untouched), while
the step k still advances, as for every table that a step leaves untouched
(METHODS.md), so k stays the same in every kernel and on every rank. Nothing is
raised inside backward: an exception there aborts the autograd graph task mid-way and
leaves DDP's reducer waiting for gradients forever ("unmarked_param_indices" on the
next step). The refusal is recorded, and ``"raise"`` raises it once backward has
finished, from a callback queued on the autograd engine (:func:`raise_refused_steps`,
also callable directly). That split (mask the update where the data is, report at a
point where it is safe) is also how a device-side check reports: there the flag
would be a device tensor read by the same function, without stalling the stream.

Data-parallel replicas (``replicas``): each replica looks up its own batch, and its
backward swaps its share of the batch for every replica's (what the update reads:
lookups and bag gradients, see :class:`ReplicaSync`) before updating, so every
replica applies the update of the global batch. The kernel only calls the hook;
``torchrec_adaptive.distributed.replicated`` implements it with torch.distributed.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..rules.apply import RowUpdate, Workspace, update_rows
from ..rules.configs import RuleConfig
from ..rules.optimizers import count_quantile
from ..rules.transforms import scale_by_row_frequency
from . import fused_cpu
from .fused_cpu import LookupGrad
from .inputs import BOUNDS_CHECK_MODES, NONFINITE_MODES, check_bounds, check_input_tensors, nonfinite_features
from .layout import DimGroup, TableSpec, plan_layout
from .reinit import hashed_uniform, table_salt
from .sharpness import CapturedRows, SavedRows, row_scale

POOLING_MODES = ("sum", "mean")
_NO_GRAD = torch.empty(0)  # RowUpdate.grad for the fused loops, which sum the lookups themselves


@dataclass
class GroupLookups:
    """One dim-group's share of a batch, kept from forward for the fused backward."""

    indices: Tensor  # [L_g] int64, rows relative to the group's block
    offsets: Tensor  # [F_g * B + 1] int64
    bag_lengths: Tensor  # [F_g * B]
    per_sample_weights: Tensor | None


@dataclass
class GroupBatch:
    """All the fused update reads of one dim-group's batch: its lookups and each bag's
    pooled-output gradient (``bag_grads[i]`` belongs to the i-th bag of ``lookups``)."""

    lookups: GroupLookups
    bag_grads: Tensor  # [bags, D]


class ReplicaSync(Protocol):
    """The data-parallel replicas of one kernel (same tables, same layout, one per rank).

    ``gather`` is called in every replica's backward (so it may be collective) with this
    replica's batch per dim group and whether its output gradient is non-finite; it
    returns the global batch per dim group (identical on every replica, so the replicas
    stay identical) and the indices of the replicas whose gradient is non-finite.
    ``index`` is this replica's; statistics count replica 0 only.
    """

    index: int

    def gather(self, batches: list[GroupBatch], nonfinite: bool) -> tuple[list[GroupBatch], list[int]]: ...


def _batch_major(
    rows: Tensor, offsets: Tensor, bag_lengths: Tensor, psw: Tensor | None, num_features: int, batch_size: int
) -> GroupLookups:
    """Reorders KJT's feature-major bags (f, b) to batch-major (b, f).

    Then the pooled output [B * F, D] *is* the [B, F * D] result and the output
    gradient is already the per-bag gradient matrix: no transposed copy of the
    whole output in forward or backward (those copies cost more than the lookup).
    """
    order = torch.arange(num_features * batch_size, device=rows.device).view(num_features, batch_size).t().reshape(-1)
    lengths = bag_lengths[order]
    new_offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=rows.device)
    torch.cumsum(lengths, 0, out=new_offsets[1:])
    shift = torch.repeat_interleave(offsets[:-1][order] - offsets[0] - new_offsets[:-1], lengths, output_size=rows.numel())
    perm = shift + torch.arange(rows.numel(), device=rows.device)
    return GroupLookups(rows[perm], new_offsets, lengths, psw[perm] if psw is not None else None)


class _FusedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weights: Tensor, module: "BatchedAdaptiveEmbeddingBag", lookups: list[GroupLookups], batch_size: int) -> Tensor:  # type: ignore[override]
        ctx.module, ctx.lookups, ctx.batch_size = module, lookups, batch_size
        return module._pooled_forward(lookups, batch_size)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[None, None, None, None]:  # type: ignore[override]
        ctx.module._fused_backward(ctx.lookups, ctx.batch_size, grad_output)
        return None, None, None, None


# Kernels holding a refused step not yet reported (see the module docstring).
_REFUSED: "weakref.WeakSet[BatchedAdaptiveEmbeddingBag]" = weakref.WeakSet()


def raise_refused_steps() -> None:
    """Raise one ``FloatingPointError`` for every step refused (``nonfinite="raise"``)
    since the last call, naming the tables and features; a no-op when there is none.

    Queued on the autograd engine by a refusing backward, so ``loss.backward()`` raises
    it after the backward (DDP's reducer included) has finished; a training loop that
    catches it can zero its dense gradients and go on with the next batch.
    """
    kernels = list(_REFUSED)
    _REFUSED.clear()
    messages = [m for k in kernels for m in k._take_refusals()]
    if messages:
        raise FloatingPointError("; ".join(messages))


def _raise_after_backward() -> None:
    """Queue :func:`raise_refused_steps` to run when the current backward has finished.

    Final callbacks run in the order queued; DDP queues its own (``finalize_backward``)
    while the graph runs, possibly after ours. A callback that raises stops the ones
    after it, so ours first queues itself again: the second time it is last, after
    everything queued during the backward."""
    engine = torch.autograd.Variable._execution_engine  # type: ignore[attr-defined]
    try:
        engine.queue_callback(lambda: engine.queue_callback(raise_refused_steps))
    except RuntimeError:  # not inside an engine-run backward (a direct call): report now
        raise_refused_steps()


def default_weights_init(table: TableSpec, weight: Tensor) -> None:
    """TorchRec's default for ``EmbeddingBagConfig``: U(-sqrt(1/n), sqrt(1/n)), n the global rows."""
    weight.uniform_(*table.bounds)


class BatchedAdaptiveEmbeddingBag(nn.Module):
    """Table-batched pooled embedding lookup with a fused, lazy, per-row optimizer.

    Args:
        tables: the tables held in one flat buffer (mixed dims allowed).
        rule: the update rule (e.g. ``AdamARConfig``), from ``Cls.rule_config(**kwargs)``.
        feature_table_map: table of each input feature (several features may share a table).
        pooling: ``"sum"`` or ``"mean"``.
        bounds_check: ``"error"`` (raise naming table and ID), ``"warn"`` (clamp into range), ``"off"``.
        nonfinite: NaN/Inf output gradients are refused before they reach the weights
            (no row or state changes; the step k advances as for every table):
            ``"raise"`` a ``FloatingPointError`` once backward has finished, or ``"skip"``
            with a warning.
        weights_init: ``f(table, weight_view)``; TorchRec's default uniform init if None.
        validate_offsets: check offsets are monotone and end at len(indices) (a host sync).
        fused: on CPU, run known chains through the compiled loops of ``fused_cpu``
            (same results as the eager chain, which ``fused=False`` forces).
    """

    def __init__(
        self,
        tables: Sequence[TableSpec],
        rule: RuleConfig,
        *,
        feature_table_map: Sequence[int] | None = None,
        pooling: str = "sum",
        device: torch.device | str | None = None,
        bounds_check: str = "error",
        nonfinite: str = "raise",
        weights_init: Callable[[TableSpec, Tensor], None] | None = None,
        validate_offsets: bool = True,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        if bounds_check not in BOUNDS_CHECK_MODES:
            raise ValueError(f"bounds_check must be one of {BOUNDS_CHECK_MODES}, got {bounds_check!r}")
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if not isinstance(rule, RuleConfig):
            raise TypeError(f"rule must be a RuleConfig (e.g. AdamAR.rule_config(...)), got {type(rule).__name__}")
        self.layout = plan_layout(tables, feature_table_map)
        self.rule = rule
        self.chain = rule.build()
        self.pooling = pooling
        self.bounds_check = bounds_check
        self.nonfinite = nonfinite
        self.validate_offsets = validate_offsets
        self.learning_rate = rule.lr
        self.optimizer_step = 0
        self.epoch = 1
        device = torch.device(device) if device is not None else torch.device("cpu")

        lay = self.layout
        self.weights = nn.Parameter(torch.empty(lay.total_elems, device=device))
        init = weights_init or default_weights_init
        with torch.no_grad():
            for t, w in zip(lay.tables, self.split_embedding_weights()):
                init(t, w)
        # Flat storage for every state slot, in the same layout as the weights.
        self._slots = self.chain.slots()
        for s in self._slots:
            size = lay.total_elems if s.per_element else lay.total_rows
            self.register_buffer(f"state_{s.name}", torch.full((size,), s.init, dtype=s.dtype, device=device))

        ftm = torch.tensor(lay.feature_table_map, dtype=torch.long)
        rows = torch.tensor([t.num_rows for t in lay.tables], dtype=torch.long)
        group_start = torch.tensor([lay.groups[g].row_start for g in lay.feature_group], dtype=torch.long)
        self.register_buffer("_feature_rows", rows[ftm].to(device), persistent=False)
        # Row offset of each feature's table inside its dim-group block.
        self.register_buffer(
            "_feature_row_offset", (torch.tensor(lay.row_start)[ftm] - group_start).to(device), persistent=False
        )
        kappa = torch.tensor([t.lr_multiplier * rule.lr_multiplier for t in lay.tables], dtype=torch.float32)
        self.register_buffer("_table_kappa", kappa.to(device), persistent=False)
        self._feature_cols: list[tuple[int, int]] = []
        col = 0
        for f in range(len(lay.feature_table_map)):
            d = lay.tables[lay.feature_table_map[f]].dim
            self._feature_cols.append((col, col + d))
            col += d
        self._workspace = Workspace()
        self._capture_next = False
        self._refuse_next_update = False  # a refused Helen capture refuses its second pass too
        self._refresh_due = False  # FAL's quantile tau must be re-estimated at the next update
        self._refusals: list[str] = []
        self.captured: list[CapturedRows] = []
        self._perturbed: list[SavedRows] = []
        self._fused = fused_cpu.fused_for(self.chain, device, self.weights.dtype) if fused else None
        self._fal = next((t for t in self.chain.transforms if isinstance(t, scale_by_row_frequency)), None)
        self.replicas: ReplicaSync | None = None  # set for data-parallel replicas (see the module docstring)

    # ------------------------------------------------------------------ views
    def _slot_buffer(self, name: str) -> Tensor:
        return getattr(self, f"state_{name}")

    def _group_views(self, g: DimGroup) -> tuple[Tensor, dict[str, Tensor]]:
        n, d = g.num_rows, g.dim
        w = self.weights.detach()[g.elem_start : g.elem_start + n * d].view(n, d)
        state = {}
        for s in self._slots:
            buf = self._slot_buffer(s.name)
            if s.per_element:
                state[s.name] = buf[g.elem_start : g.elem_start + n * d].view(n, d)
            else:
                state[s.name] = buf[g.row_start : g.row_start + n]
        return w, state

    def split_embedding_weights(self) -> list[Tensor]:
        """Per table, a ``[num_rows, dim]`` view into the flat buffer (table order)."""
        lay = self.layout
        return [
            self.weights.detach()[lay.elem_start[i] : lay.elem_start[i] + t.num_rows * t.dim].view(t.num_rows, t.dim)
            for i, t in enumerate(lay.tables)
        ]

    def get_optimizer_state(self) -> list[dict[str, Tensor]]:
        """Per table, its state slots as views: per-row ``[num_rows]``, per-element ``[num_rows, dim]``."""
        lay = self.layout
        out = []
        for i, t in enumerate(lay.tables):
            d: dict[str, Tensor] = {}
            for s in self._slots:
                buf = self._slot_buffer(s.name)
                if s.per_element:
                    d[s.name] = buf[lay.elem_start[i] : lay.elem_start[i] + t.num_rows * t.dim].view(t.num_rows, t.dim)
                else:
                    d[s.name] = buf[lay.row_start[i] : lay.row_start[i] + t.num_rows]
            out.append(d)
        return out

    # ------------------------------------------------- FBGEMM-shaped controls
    def get_learning_rate(self) -> float:
        return self.learning_rate

    def set_learning_rate(self, lr: float) -> None:
        if isinstance(lr, bool) or not isinstance(lr, (int, float)):
            raise TypeError(f"learning rate must be a number, got {lr!r} ({type(lr).__name__})")
        if not (lr >= 0 and math.isfinite(lr)):
            raise ValueError(f"learning rate must be >= 0 and finite, got {lr}")
        self.learning_rate = float(lr)

    def set_optimizer_step(self, step: int) -> None:
        if step < 0:
            raise ValueError(f"optimizer step must be >= 0, got {step}")
        self.optimizer_step = int(step)

    def update_hyper_parameters(self, params: dict[str, float]) -> None:
        params = dict(params)
        if "lr" in params:
            self.set_learning_rate(params.pop("lr"))
        self.chain.set_hyper_parameters(params)

    def flush(self) -> None:
        """Nothing is cached off the weights, so there is nothing to write back."""

    def set_epoch(self, epoch: int) -> None:
        """FAL's m_r(e) uses the epoch; a ratio tail threshold is re-estimated here."""
        if epoch < 1:
            raise ValueError(f"epochs count from 1, got {epoch}")
        if epoch < self.epoch:
            raise ValueError(f"epoch {epoch} is before the current epoch {self.epoch}: epochs only go forward")
        self.epoch = int(epoch)
        self.refresh_row_statistics()

    def restore_epoch(self, epoch: int) -> None:
        """Set the epoch from a checkpoint (may go backwards, unlike :meth:`set_epoch`)."""
        if epoch < 1:
            raise ValueError(f"epochs count from 1, got {epoch}")
        self.epoch = int(epoch)
        self._refresh_due = True  # the counts may not be loaded yet: re-estimate at the next update

    @torch.no_grad()
    def reinit_rows(self, table: int, rows: Tensor, *, seed: int, epoch: int, reset_state: bool = True,
                    keep_counts: bool = True) -> None:
        """MEDA: give ``rows`` (local ids) of ``table`` fresh values from the table's
        initializer, a function of (seed, epoch, table, global row, column) only
        (kernels/reinit.py), so any sharding of the table gets the same values.

        ``reset_state`` zeroes the rule's state of those rows (moments, Adagrad sums)
        and sets their last-touched step s_r to the current step, so AdamAR's idle
        decay counts from the re-initialization instead of shrinking the fresh row by
        alpha * k. Counts c_r are kept unless ``keep_counts=False``.
        """
        spec = self.layout.tables[table]
        rows = rows.to(device=self.weights.device, dtype=torch.long)
        if rows.numel() == 0:
            return
        cols = torch.arange(spec.col_offset, spec.col_offset + spec.dim, device=rows.device)
        salt = table_salt(seed, epoch, spec.table_name)
        values = hashed_uniform(salt, rows + spec.row_offset, cols, *spec.bounds).to(self.weights.dtype)
        self.split_embedding_weights()[table].index_copy_(0, rows, values)
        if not reset_state:
            return
        state = self.get_optimizer_state()[table]
        for slot in self._slots:
            if slot.name == "row_count" and keep_counts:
                continue
            fill = float(self.optimizer_step) if slot.name == "row_last_step" else slot.init
            state[slot.name].index_fill_(0, rows, fill)

    def refresh_row_statistics(self) -> None:
        """Re-estimate FAL's per-table quantile threshold from the counts so far."""
        if self._fal is None or not self._fal.tau_is_ratio:
            return
        counts = self.get_optimizer_state()
        self._fal.tau_by_table = torch.stack([count_quantile(c["row_count"], self._fal.tau) for c in counts])

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer_step": self.optimizer_step, "learning_rate": self.learning_rate, "epoch": self.epoch}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.optimizer_step = int(state["optimizer_step"])
        self.learning_rate = float(state["learning_rate"])
        self.restore_epoch(int(state["epoch"]))

    # ---------------------------------------------------------------- forward
    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None = None) -> Tensor:
        lay = self.layout
        batch_size = check_input_tensors(lay, indices, offsets, per_sample_weights, self.validate_offsets)
        if per_sample_weights is not None and self.pooling != "sum":
            raise ValueError("per_sample_weights need pooling='sum' (as in torch.nn.EmbeddingBag)")
        num_features = len(lay.feature_table_map)
        indices, offsets = indices.long(), offsets.long()
        bag_lengths = offsets[1:] - offsets[:-1]
        feature_lengths = bag_lengths.view(num_features, batch_size).sum(dim=1)
        feature_of_lookup = torch.repeat_interleave(torch.arange(num_features, device=indices.device), feature_lengths)
        indices = check_bounds(lay, indices, feature_of_lookup, self._feature_rows, self.bounds_check)
        block_rows = indices + self._feature_row_offset[feature_of_lookup]
        psw = per_sample_weights.to(self.weights.dtype) if per_sample_weights is not None else None

        lookups = []
        if len(lay.groups) == 1:
            lookups.append(_batch_major(block_rows, offsets, bag_lengths, psw, num_features, batch_size))
        else:
            group_of_feature = torch.tensor(lay.feature_group, device=indices.device)
            lookup_group = group_of_feature[feature_of_lookup]
            for g, grp in enumerate(lay.groups):
                mask = lookup_group == g
                lengths = bag_lengths.view(num_features, batch_size)[list(grp.features)].reshape(-1)
                offs = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=indices.device)
                torch.cumsum(lengths, 0, out=offs[1:])
                lookups.append(GroupLookups(block_rows[mask], offs, lengths, psw[mask] if psw is not None else None))
        return _FusedLookup.apply(self.weights, self, lookups, batch_size)

    def _pooled_forward(self, lookups: list[GroupLookups], batch_size: int) -> Tensor:
        lay = self.layout
        if len(lay.groups) == 1:  # bags are batch-major: the output needs no transpose
            w, _ = self._group_views(lay.groups[0])
            return self._embedding_bag(w, lookups[0]).view(batch_size, self._feature_cols[-1][1])
        pieces: list[Tensor] = [torch.empty(0)] * len(lay.feature_table_map)
        for g, lk in zip(lay.groups, lookups):
            if not g.features:
                continue
            w, _ = self._group_views(g)
            out = self._embedding_bag(w, lk).view(len(g.features), batch_size, g.dim)
            for j, f in enumerate(g.features):
                pieces[f] = out[j]
        return torch.cat(pieces, dim=1)

    def _embedding_bag(self, weight: Tensor, lk: GroupLookups) -> Tensor:
        return F.embedding_bag(
            lk.indices, weight, lk.offsets, mode=self.pooling,
            per_sample_weights=lk.per_sample_weights, include_last_offset=True,
        )

    # --------------------------------------------------------------- backward
    @torch.no_grad()
    def _fused_backward(self, lookups: list[GroupLookups], batch_size: int, grad_output: Tensor) -> None:
        lay = self.layout
        batches, bad = self._backward_batches(lookups, batch_size, grad_output)
        self.restore_perturbation()  # a perturbation never outlives the backward it was made for
        if bad:
            self._refuse(bad)
            return
        if self._capture_next:
            self._capture(batches)
            return
        if all(b.lookups.bag_lengths.numel() == 0 for b in batches):
            return  # an empty batch (on every replica) is no training step: nothing changes, k included
        step = self.optimizer_step + 1
        if self._refuse_next_update:  # the second pass of a refused Helen step
            self._refuse_next_update = False
            self.optimizer_step = step
            return
        if self._fal is not None and self._fal.tau_is_ratio and (
                self._refresh_due or (step - 1) % self.rule.fal.tau_refresh_steps == 0):  # type: ignore[union-attr]
            self.refresh_row_statistics()
        self._refresh_due = False
        for g, batch in zip(lay.groups, batches):
            if not g.features or batch.lookups.indices.numel() == 0:
                continue
            w, state = self._group_views(g)
            if self._fused is not None:  # CPU: lookups grouped by row in C++, then the fused loops
                lk = batch.lookups
                rows, occurrences, grad = self._fused.coalesce(
                    lk.indices, lk.offsets, lk.per_sample_weights, self.pooling, g.num_rows, batch.bag_grads)
                lr, table = self._row_learning_rates(g, rows)
                upd = RowUpdate(rows, _NO_GRAD, occurrences, lr, table, self.learning_rate)
                self._fused.update(w, state, upd, grad, step, self.epoch)
            else:
                rows, occurrences, grad = self._sorted_lookups(batch.lookups, batch.bag_grads)
                lr, table = self._row_learning_rates(g, rows)
                upd = RowUpdate(rows, grad.materialize(), occurrences, lr, table, self.learning_rate)
                update_rows(self.chain, w, state, upd, step, self.epoch, self._workspace)
        self.optimizer_step = step

    def _refuse(self, bad: str) -> None:
        """Refuse this backward's update (see the module docstring): no row changes, k
        advances unless it was a Helen capture (which updates nothing anyway, and whose
        second pass is then refused too)."""
        if self._capture_next:
            self._capture_next = False
            self.captured = []
            self._refuse_next_update = True
            what = "the step was refused"
        else:
            self._refuse_next_update = False
            self.optimizer_step += 1
            what = f"the update was refused, weights and optimizer state are unchanged (step k = {self.optimizer_step})"
        msg = f"non-finite gradient for {bad}; {what}"
        if self.nonfinite == "skip":
            warnings.warn(msg + "; step skipped", RuntimeWarning, stacklevel=3)
            return
        self._refusals.append(msg)
        _REFUSED.add(self)
        _raise_after_backward()

    def _take_refusals(self) -> list[str]:
        out, self._refusals = self._refusals, []
        return out

    def _backward_batches(self, lookups: list[GroupLookups], batch_size: int,
                          grad_output: Tensor) -> tuple[list[GroupBatch], str]:
        """Each dim group's batch with its bags' output gradients, and what is non-finite
        ("" if nothing). A data-parallel replica gets every replica's batch here, and
        learns whether any replica's gradient is non-finite, so all of them apply (or
        refuse) the same update."""
        bad = nonfinite_features(self.layout, grad_output, self._feature_cols)
        batches = [GroupBatch(lk, self._bag_grads(g, grad_output, batch_size))
                   for g, lk in zip(self.layout.groups, lookups)]
        if self.replicas is None:
            return batches, ", ".join(bad)
        batches, bad_replicas = self.replicas.gather(batches, bool(bad))
        others = [r for r in bad_replicas if r != self.replicas.index]
        tables = ", ".join(repr(n) for n in dict.fromkeys(t.table_name for t in self.layout.tables))
        what = ([", ".join(bad)] if bad else []) + (
            [f"data-parallel replica(s) {others} of table(s) {tables}"] if others else [])
        return batches, " and ".join(what)

    # ------------------------------------------------------ Helen (sharpness)
    def capture_next_backward(self) -> None:
        """The next backward records the touched rows' gradients and updates nothing
        (no weight, state or step change): Helen's first pass."""
        self._capture_next = True
        self._refuse_next_update = False
        self.captured = []

    def _capture(self, batches: list[GroupBatch]) -> None:
        self._capture_next = False
        counts = self._slot_buffer("row_count")
        for gi, (g, batch) in enumerate(zip(self.layout.groups, batches)):
            if not g.features or batch.lookups.indices.numel() == 0:
                continue
            lk = batch.lookups
            if self._fused is not None:  # CPU: no [U, D] gradient is stored, only its lookups and norms
                rows, occurrences, grad = self._fused.coalesce(
                    lk.indices, lk.offsets, lk.per_sample_weights, self.pooling, g.num_rows, batch.bag_grads, f"capture/{gi}")
                dense, norm = None, self._fused.row_norms(rows, grad)
            else:
                rows, occurrences, grad = self._sorted_lookups(lk, batch.bag_grads)
                dense = grad.materialize()
                norm = dense.norm(dim=1)
            starts = torch.tensor(g.table_row_starts, device=rows.device)
            table = torch.tensor(g.tables, device=rows.device)[torch.searchsorted(starts, rows, right=True) - 1]
            c = counts[g.row_start : g.row_start + g.num_rows][rows] + occurrences
            self.captured.append(CapturedRows(gi, rows, c, table, norm, grad, dense))

    def local_max_counts(self) -> dict[str, float]:
        """max c_r per table on this rank, counting the captured batch (for rho_r)."""
        out: dict[str, float] = {}
        states = self.get_optimizer_state()
        for t, spec in enumerate(self.layout.tables):
            out[spec.table_name] = max(out.get(spec.table_name, 0.0), float(states[t]["row_count"].max()))
        for cap in self.captured:
            for t in cap.table.unique().tolist():
                name = self.layout.tables[t].table_name
                out[name] = max(out[name], float(cap.counts[cap.table == t].max()))
        return out

    @torch.no_grad()
    def perturb_captured(self, rho: float, xi: float, max_count: dict[str, float]) -> None:
        """w_r += eps_r on the captured rows; the originals are kept for ``restore_perturbation``."""
        if self._perturbed:
            raise RuntimeError("rows are already perturbed; restore them first")
        peak = torch.tensor([max_count[t.table_name] for t in self.layout.tables], dtype=torch.float32,
                            device=self.weights.device)
        for cap in self.captured:
            w, _ = self._group_views(self.layout.groups[cap.group])
            scale = row_scale(cap, rho, xi, peak)
            if cap.dense is None:  # fused CPU capture: perturb in place, saving the rows in one pass
                assert self._fused is not None
                self._perturbed.append(SavedRows(w, cap.rows, self._fused.perturb(w, cap.rows, cap.grad, scale, cap.group)))
                continue
            self._perturbed.append(SavedRows(w, cap.rows, w.index_select(0, cap.rows)))
            w.index_add_(0, cap.rows, (cap.dense * scale.unsqueeze(1)).to(w.dtype))
        self.captured = []

    @torch.no_grad()
    def restore_perturbation(self) -> None:
        """Write the perturbed rows' original values back (bit-exact); no-op if none."""
        for saved in reversed(self._perturbed):
            saved.restore()
        self._perturbed = []

    def _bag_grads(self, g: DimGroup, grad_output: Tensor, batch_size: int) -> Tensor:
        """The output gradient of each bag of this group, as a [bags, D] matrix in the
        order of the group's bags (batch-major for one group: a view, no copy)."""
        if not g.features:
            return grad_output.new_zeros(0, g.dim)
        if len(self.layout.groups) == 1:
            return grad_output.contiguous().view(grad_output.shape[0] * len(g.features), g.dim)
        cols = [grad_output[:, a:b] for f in g.features for a, b in [self._feature_cols[f]]]
        return torch.stack(cols, dim=0).reshape(-1, g.dim)

    def _sorted_lookups(self, lk: GroupLookups, bag_grads: Tensor) -> tuple[Tensor, Tensor, LookupGrad]:
        """Unique rows, their occurrence counts, and their lookups grouped by row
        (see the module docstring: a row's gradient is a bag over output gradients)."""
        sorted_rows, perm = torch.sort(lk.indices)
        rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
        num_bags = lk.bag_lengths.numel()
        bag_of_lookup = torch.repeat_interleave(
            torch.arange(num_bags, device=perm.device), lk.bag_lengths, output_size=lk.indices.numel()
        )
        if lk.per_sample_weights is not None:
            lookup_weight: Tensor | None = lk.per_sample_weights[perm]
        elif self.pooling == "mean":
            lookup_weight = (1.0 / lk.bag_lengths.clamp(min=1).to(bag_grads.dtype))[bag_of_lookup][perm]
        else:
            lookup_weight = None
        row_offsets = torch.zeros(rows.numel() + 1, dtype=torch.long, device=rows.device)
        torch.cumsum(counts, 0, out=row_offsets[1:])
        grad = LookupGrad(row_offsets, bag_of_lookup[perm], lookup_weight, bag_grads)
        return rows, counts.to(torch.float32), grad

    def _row_learning_rates(self, g: DimGroup, rows: Tensor) -> tuple[Tensor, Tensor | None]:
        """lr * kappa_t per row, and each row's table index when a rule needs it."""
        need_table = len(g.tables) > 1 and (
            (self._fal is not None and self._fal.tau_is_ratio)
            or len({self.layout.tables[t].lr_multiplier for t in g.tables}) > 1
        )
        if not need_table:
            kappa = float(self._table_kappa[g.tables[0]])
            table = torch.full_like(rows, g.tables[0]) if (self._fal is not None and self._fal.tau_is_ratio) else None
            return torch.full((rows.numel(), 1), self.learning_rate * kappa, device=rows.device), table
        starts = torch.tensor(g.table_row_starts, device=rows.device)
        table = torch.tensor(g.tables, device=rows.device)[torch.searchsorted(starts, rows, right=True) - 1]
        return (self.learning_rate * self._table_kappa[table]).unsqueeze(1), table
