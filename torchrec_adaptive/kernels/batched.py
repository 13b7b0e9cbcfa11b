"""``AdaptiveTBE``: a table-batched embedding bag whose backward
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

Who applies the update (``backend``, chosen per device at each step, see
:class:`~torchrec_adaptive.kernels.inputs.KernelOptions`): the eager chain (the rule's
transforms as torch ops, any device), the compiled CPU loops (``fused_cpu``, CPU) or the
Triton kernels (``triton_rows``, the CUDA default), which sum each touched row's lookups
in registers and update it in place. The triton path is also the one with no host sync:
its layout has upper-bound sizes and its checks are device-side flags
(:class:`~torchrec_adaptive.kernels.inputs.DeviceChecks`), read a step later.

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
from ..rules.slot_names import COUNT, LAST_STEP, rename_previous_buffers
from ..rules.transforms import scale_by_row_frequency
from . import fused_cpu, host_memory, triton_rows
from .fused_cpu import FusedChain, LookupGrad
from .inputs import (DeviceChecks, KernelOptions, check_bounds, check_input_tensors, negative_bag_message,
                     nonfinite_features, offsets_range_message, raise_or_warn_bad_ids, refused_update_message)
from .layout import DimGroup, TableSpec, plan_layout
from .reinit import hashed_uniform, table_salt
from .sharpness import (CapturedGrouping, CapturedRows, CountPeaks, SavedRows, buffer_version, counts_only_grow,
                        reused_rows, row_scale, table_segments)

POOLING_MODES = ("sum", "mean")
_NO_GRAD = torch.empty(0)  # RowUpdate.grad for the fused loops, which sum the lookups themselves


@dataclass
class GroupLookups:
    """One dim-group's share of a batch, kept from forward for the fused backward."""

    indices: Tensor  # [L_g] int64, rows relative to the group's block
    offsets: Tensor  # [F_g * B + 1] int64
    bag_lengths: Tensor  # [F_g * B]
    per_sample_weights: Tensor | None  # with MEAN pooling only when ``invalid`` is set: then 1/len folded in
    invalid: Tensor | None = None  # [L_g] bool: bad IDs and padding that train nothing (device checks only)

    def compact(self) -> "GroupLookups":
        """Without the lookups that train nothing, for the paths that sync anyway (Helen's
        capture, data-parallel replicas): a boolean mask, so a host sync."""
        if self.invalid is None:
            return self
        n, bags = self.indices.numel(), self.bag_lengths.numel()
        lengths = torch.cat([self.bag_lengths, (n - self.offsets[-1]).reshape(1)])
        bag = torch.repeat_interleave(torch.arange(bags + 1, device=self.indices.device), lengths, output_size=n)
        keep = ~self.invalid
        kept = torch.bincount(bag[keep], minlength=bags + 1)[:bags]
        offsets = torch.zeros(bags + 1, dtype=torch.long, device=self.indices.device)
        torch.cumsum(kept, 0, out=offsets[1:])
        psw = self.per_sample_weights
        return GroupLookups(self.indices[keep], offsets, kept, psw[keep] if psw is not None else None)


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
    rows: Tensor, offsets: Tensor, bag_lengths: Tensor, psw: Tensor | None, num_features: int, batch_size: int,
    invalid: Tensor | None = None,
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
    return GroupLookups(rows[perm], new_offsets, lengths, psw[perm] if psw is not None else None,
                        invalid[perm] if invalid is not None else None)


@dataclass(frozen=True)
class UpdatePath:
    """How the kernel updates rows on one device: the backend that runs and its plan."""

    backend: str  # "triton" | "cpu" | "eager"
    plan: Any = None  # triton_rows.TritonChain | fused_cpu.FusedChain | None (eager)

    @property
    def device_checks(self) -> bool:
        """Checks run on the device (no host sync) where the step itself has none."""
        return self.backend == "triton"


class _FusedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weights: Tensor, module: "AdaptiveTBE", lookups: list[GroupLookups], batch_size: int) -> Tensor:  # type: ignore[override]
        ctx.module, ctx.lookups, ctx.batch_size = module, lookups, batch_size
        return module._pooled_forward(lookups, batch_size)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[None, None, None, None]:  # type: ignore[override]
        ctx.module._fused_backward(ctx.lookups, ctx.batch_size, grad_output)
        return None, None, None, None


# Kernels holding a refused step not yet reported (see the module docstring).
_REFUSED: "weakref.WeakSet[AdaptiveTBE]" = weakref.WeakSet()


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


class AdaptiveTBE(nn.Module):
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
        validate_offsets: check offsets are monotone and end at len(indices) (a host sync
            on the cpu/eager backends; on the device with triton).
        backend: ``"triton"``, ``"cpu"``, ``"eager"`` or None (by the weights' device at each
            step: cpu loops on CPU, triton elsewhere); see :class:`KernelOptions`. A chain the
            backend cannot run uses the eager chain, with a warning naming the cost.
        sync_check_interval: triton backend: read the device-side check flags every N steps.
        fused: ``False`` forces the eager chain (the same as ``backend="eager"``).
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
        backend: str | None = None,
        sync_check_interval: int = 1,
    ) -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
        if not fused and backend not in (None, "eager"):
            raise ValueError(f"fused=False forces the eager chain; it contradicts backend={backend!r}")
        self.options = KernelOptions(bounds_check=bounds_check, nonfinite=nonfinite,
                                     backend=backend if fused else "eager",
                                     sync_check_interval=sync_check_interval, validate_offsets=validate_offsets)
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
        self.weights = nn.Parameter(host_memory.empty(lay.total_elems, device=device))
        init = weights_init or default_weights_init
        with torch.no_grad():
            for t, w in zip(lay.tables, self.split_embedding_weights()):
                init(t, w)
        # Flat storage for every state slot, in the same layout as the weights.
        self._slots = self.chain.slots()
        for s in self._slots:
            size = lay.total_elems if s.per_element else lay.total_rows
            self.register_buffer(f"state_{s.name}", host_memory.full(size, s.init, dtype=s.dtype, device=device))
        self.register_load_state_dict_pre_hook(rename_previous_buffers)  # state_dicts with older slot names load

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
        self._kappa_host = kappa.tolist()  # the same float32 values, read without a device sync
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
        self._groupings: dict[int, CapturedGrouping] = {}  # the last capture's, per dim group (Helen)
        self._count_peaks = CountPeaks()  # max c_r per table, once Helen asks for it
        self._captured_grads: dict[int, Tensor] = {}  # per dim group, g_r of Helen's capture (CPU loops), reused
        self._const_cache: dict[tuple[str, torch.device], Tensor] = {}
        self._paths: dict[tuple[torch.device, torch.dtype], UpdatePath] = {}  # planned per device (.to() moves)
        self._checks = DeviceChecks(lay, self._feature_cols, self.options.sync_check_interval)
        self._fal = next((t for t in self.chain.transforms if isinstance(t, scale_by_row_frequency)), None)
        self.replicas: ReplicaSync | None = None  # set for data-parallel replicas (see the module docstring)

    # ------------------------------------------------------------ update path
    def update_path(self) -> UpdatePath:
        """The backend that updates rows on the weights' current device, planned on first
        use per device and dtype (so a kernel moved by ``.to()`` re-plans)."""
        key = (self.weights.device, self.weights.dtype)
        path = self._paths.get(key)
        if path is None:
            path = self._paths[key] = self._plan_path(*key)
        return path

    def _plan_path(self, device: torch.device, dtype: torch.dtype) -> UpdatePath:
        requested = self.options.backend
        backend = requested or ("cpu" if device.type == "cpu" else "triton")
        if backend == "eager":
            return UpdatePath("eager")
        why = None
        if dtype != torch.float32:
            why = f"its kernels update float32 weights, these are {dtype}"
        elif FusedChain.plan(self.chain) is None:
            why = f"the chain {[type(t).__name__ for t in self.chain.transforms]} has a transform it does not know"
        elif backend == "cpu":
            if device.type != "cpu":
                why = f"it runs CPU tensors only, the weights are on {device}"
            elif fused_cpu.extension() is None:
                why = "its C++ extension is disabled or could not be built"
                if requested is None:  # the default on CPU: fused_cpu already said why (or was told to)
                    return UpdatePath("eager")
        else:
            why = triton_rows.unavailable_reason(device)
        if why is None:
            plan = fused_cpu.fused_for(self.chain, device, dtype) if backend == "cpu" else \
                triton_rows.TritonChain.for_chain(self.chain)
            return UpdatePath(backend, plan)
        if requested is not None or device.type != "cpu":
            tables = [t.name for t in self.layout.tables]
            warnings.warn(
                f"torchrec_adaptive: tables {tables}: the {backend!r} backend cannot run {self.rule.name} here ({why}); "
                "using the eager chain: ~30 torch ops per dim group and step and, on a GPU, several host syncs per "
                "step (unique, the checks); same results, slower", RuntimeWarning, stacklevel=4)
        return UpdatePath("eager")

    @property
    def _fused(self) -> FusedChain | None:
        """The compiled CPU loops' plan when they run the update on the current device."""
        path = self.update_path()
        return path.plan if path.backend == "cpu" else None

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
            if slot.name == COUNT and keep_counts:
                continue
            fill = float(self.optimizer_step) if slot.name == LAST_STEP else slot.init
            state[slot.name].index_fill_(0, rows, fill)

    def refresh_row_statistics(self) -> None:
        """Re-estimate FAL's per-table quantile threshold from the counts so far."""
        if self._fal is None or not self._fal.tau_is_ratio:
            return
        counts = self.get_optimizer_state()
        self._fal.tau_by_table = torch.stack([count_quantile(c[COUNT], self._fal.tau) for c in counts])

    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer_step": self.optimizer_step, "learning_rate": self.learning_rate, "epoch": self.epoch}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.optimizer_step = int(state["optimizer_step"])
        self.learning_rate = float(state["learning_rate"])
        self.restore_epoch(int(state["epoch"]))

    # ---------------------------------------------------------------- forward
    def forward(self, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None = None) -> Tensor:
        lay = self.layout
        path = self.update_path()
        on_device = path.device_checks
        if on_device:
            self._report_checks(self._checks.poll())  # earlier steps' flags, if their copy has landed
        host_pass = path.backend == "cpu" and indices.device.type == "cpu"  # checks offsets in its pass
        batch_size = check_input_tensors(lay, indices, offsets, per_sample_weights,
                                         self.validate_offsets and not on_device and not host_pass)
        if per_sample_weights is not None and self.pooling != "sum":
            raise ValueError("per_sample_weights need pooling='sum' (as in torch.nn.EmbeddingBag)")
        if host_pass:
            return _FusedLookup.apply(self.weights, self, self._host_lookups(path.plan, indices, offsets,
                                                                             per_sample_weights), batch_size)
        num_features = len(lay.feature_table_map)
        indices, offsets = indices.long(), offsets.long()
        step = self.optimizer_step + 1
        if on_device and self.validate_offsets:
            offsets = self._checks.offsets(offsets, indices.numel(), step)
        bag_lengths = offsets[1:] - offsets[:-1]
        feature_lengths = bag_lengths.view(num_features, batch_size).sum(dim=1)
        feature_of_lookup = torch.repeat_interleave(torch.arange(num_features, device=indices.device), feature_lengths,
                                                    output_size=indices.numel())
        invalid = None
        if on_device:
            indices, invalid = self._checks.bounds(indices, feature_of_lookup, self._feature_rows, self.bounds_check, step)
        else:
            indices = check_bounds(lay, indices, feature_of_lookup, self._feature_rows, self.bounds_check)
        block_rows = indices + self._feature_row_offset[feature_of_lookup]
        psw = per_sample_weights.to(self.weights.dtype) if per_sample_weights is not None else None
        multi = len(lay.groups) > 1
        if invalid is not None or (on_device and multi):
            # Lookups that train nothing (bad IDs, looked up clamped; a dim group's padding)
            # weigh 0, so every lookup carries a weight and MEAN's 1/len is folded into it.
            if psw is None:
                psw = torch.ones(indices.numel(), dtype=self.weights.dtype, device=indices.device)
            if invalid is not None:
                psw = psw * (~invalid)
            if self.pooling == "mean":
                psw = psw / bag_lengths.clamp(min=1).to(psw.dtype).repeat_interleave(
                    bag_lengths, output_size=indices.numel())

        lookups = []
        if len(lay.groups) == 1:
            lookups.append(_batch_major(block_rows, offsets, bag_lengths, psw, num_features, batch_size, invalid))
        else:
            lookup_group = self._device_const("feature_group", lay.feature_group, indices.device)[feature_of_lookup]
            for g, grp in enumerate(lay.groups):
                features = self._device_const(f"features{g}", grp.features, indices.device)
                lengths = bag_lengths.view(num_features, batch_size).index_select(0, features).reshape(-1)
                offs = torch.zeros(lengths.numel() + 1, dtype=torch.long, device=indices.device)
                torch.cumsum(lengths, 0, out=offs[1:])
                if on_device:  # no boolean mask (its size is data): all lookups, the group's first, the rest padding
                    other = lookup_group != g
                    perm = torch.argsort(other.to(torch.uint8), stable=True)
                    pad = other[perm]
                    lookups.append(GroupLookups(block_rows[perm], offs, lengths, psw[perm],  # type: ignore[index]
                                                pad if invalid is None else pad | invalid[perm]))
                    continue
                mask = lookup_group == g
                lookups.append(GroupLookups(block_rows[mask], offs, lengths, psw[mask] if psw is not None else None,
                                            invalid[mask] if invalid is not None else None))
        return _FusedLookup.apply(self.weights, self, lookups, batch_size)

    def _host_lookups(self, plan: FusedChain, indices: Tensor, offsets: Tensor,
                      per_sample_weights: Tensor | None) -> list[GroupLookups]:
        """The CPU backend's forward input work -- the checks of ``check_input_tensors``
        and ``check_bounds``, the block-row shift, and the bag order of the torch-op path
        below (batch-major for one dim group, feature-major per group otherwise) -- in one
        C++ pass (``fused_cpu.prepare_lookups``): at one ID per bag the ~15 torch ops over
        every lookup cost more than the pooling. Same errors and warnings as the torch path."""
        lay = self.layout
        groups = [self._device_const(f"features{g}", grp.features, indices.device) for g, grp in enumerate(lay.groups)]
        psw = per_sample_weights.to(self.weights.dtype) if per_sample_weights is not None else None
        prep = fused_cpu.prepare_lookups(plan.ext, indices, offsets, psw, self._feature_rows, self._feature_row_offset,
                                         groups, len(lay.groups) == 1, self.bounds_check != "off")
        if prep.offsets is not None:
            raise ValueError(offsets_range_message(indices.numel(), *prep.offsets) if len(prep.offsets) == 2
                             else negative_bag_message(*prep.offsets))
        if prep.bad_ids is not None:
            raise_or_warn_bad_ids(lay, *prep.bad_ids, self.bounds_check)
        return [GroupLookups(rows, offs, lengths, w) for rows, offs, lengths, w in prep.groups]

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
            lk.indices, weight, lk.offsets, mode="sum" if lk.invalid is not None else self.pooling,
            per_sample_weights=lk.per_sample_weights, include_last_offset=True,
        )

    # --------------------------------------------------------------- backward
    @torch.no_grad()
    def _fused_backward(self, lookups: list[GroupLookups], batch_size: int, grad_output: Tensor) -> None:
        lay = self.layout
        path = self.update_path()
        batches, bad, finite = self._backward_batches(lookups, batch_size, grad_output, path)
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
        groupings, self._groupings = self._groupings, {}  # a capture's grouping serves the next update only
        for gi, (g, batch) in enumerate(zip(lay.groups, batches)):
            if not g.features or batch.lookups.indices.numel() == 0:
                continue
            if path.backend == "triton":
                self._count_peaks.invalidate()  # its kernels write the counts where the version does not see
                self._triton_update(path.plan, g, batch, step, finite)
            else:
                self._host_update(path.plan if path.backend == "cpu" else None, g, batch, step, groupings.get(gi))
        self.optimizer_step = step
        if path.device_checks:
            self._checks.end_step(step)

    def _host_update(self, plan: FusedChain | None, g: DimGroup, batch: GroupBatch, step: int,
                     captured: CapturedGrouping | None = None) -> None:
        """One dim group's update by the compiled CPU loops (``plan``) or the eager chain;
        ``captured``: a Helen capture's grouping, used if it was of the same lookups."""
        w, state = self._group_views(g)
        lk = batch.lookups.compact()
        counts_version = self._counts_version()
        if captured is not None and captured.matches(lk.indices, lk.offsets, lk.per_sample_weights):
            rows, occurrences, grad = captured.rows, captured.occurrences, captured.with_bag_grads(batch.bag_grads, torch.float32 if plan is not None else batch.bag_grads.dtype)
        elif plan is not None:  # CPU: lookups grouped by row in C++
            rows, occurrences, grad = plan.coalesce(
                lk.indices, lk.offsets, lk.per_sample_weights, self.pooling, g.num_rows, batch.bag_grads)
        else:
            rows, occurrences, grad = self._sorted_lookups(lk, batch.bag_grads)
        lr, table = self._row_learning_rates(g, rows)
        if plan is not None:  # the fused loops
            plan.update(w, state, RowUpdate(rows, _NO_GRAD, occurrences, lr, table, self.learning_rate), grad, step,
                        self.epoch)
        else:
            upd = RowUpdate(rows, grad.materialize(), occurrences, lr, table, self.learning_rate)
            update_rows(self.chain, w, state, upd, step, self.epoch, self._workspace)
        self._fold_count_peaks(g, rows, counts_version)

    def _triton_update(self, plan: triton_rows.TritonChain, g: DimGroup, batch: GroupBatch, step: int,
                       finite: Tensor | None) -> None:
        """One dim group's update by the Triton kernels, with no host sync: the segment
        layout has upper-bound sizes, bad IDs sort past the real rows, and ``finite`` (0
        for a non-finite output gradient) masks the whole update on the device."""
        lk = batch.lookups
        n = lk.indices.numel()
        bags = lk.bag_lengths.numel()
        # one more bag holds a dim group's padding lookups (see forward), so the sizes add up to n
        lengths = torch.cat([lk.bag_lengths, (n - lk.offsets[-1]).reshape(1)])
        bag_of_lookup = torch.repeat_interleave(torch.arange(bags + 1, device=lk.indices.device), lengths,
                                                output_size=n)
        weight = lk.per_sample_weights
        if weight is None and self.pooling == "mean":
            weight = (1.0 / lk.bag_lengths.clamp(min=1).to(batch.bag_grads.dtype))[bag_of_lookup]
        rows = lk.indices if lk.invalid is None else torch.where(lk.invalid, g.num_rows, lk.indices)
        seg = triton_rows.segment_lookups(rows, bag_of_lookup, weight, sentinel=g.num_rows)
        if finite is not None:
            seg.n_valid.mul_(finite)
        lr, table = self._row_learning_rates(g, seg.rows)
        w, state = self._group_views(g)
        plan.update(w, state, seg, batch.bag_grads, lr, table, self.learning_rate, step, self.epoch)

    def check_device_flags(self) -> None:
        """Wait for the device and raise (or warn) for every check failed on it so far
        (triton backend; the others check on the host as they go). Training loops need
        not call it: the flags are read every ``sync_check_interval`` steps anyway."""
        self._report_checks(self._checks.check_now())

    def _report_checks(self, found: list[tuple[str, str]]) -> None:
        """Raise or warn for device-check failures, as the host checks would have."""
        errors: list[tuple[type[Exception], str]] = []
        for kind, msg in found:
            if kind == "offsets":
                errors.append((ValueError, msg))
            elif kind == "bounds" and self.bounds_check == "warn":
                warnings.warn(msg + "; clamped into range", RuntimeWarning, stacklevel=4)
            elif kind == "bounds":
                errors.append((IndexError, msg + "; those lookups trained nothing"))
            elif self.nonfinite == "skip":
                warnings.warn(msg + "; step skipped", RuntimeWarning, stacklevel=4)
            else:
                errors.append((FloatingPointError, msg))
        if errors:
            raise errors[0][0]("; ".join(m for _, m in errors))

    def _refuse(self, bad: str) -> None:
        """Refuse this backward's update (see the module docstring): no row changes, k
        advances unless it was a Helen capture (which updates nothing anyway, and whose
        second pass is then refused too)."""
        if self._capture_next:
            self._capture_next = False
            self.captured = []
            self._refuse_next_update = True
            msg = f"non-finite gradient for {bad}; the step was refused"
        else:
            self._refuse_next_update = False
            self.optimizer_step += 1
            msg = refused_update_message(bad, self.optimizer_step)
        if self.nonfinite == "skip":
            warnings.warn(msg + "; step skipped", RuntimeWarning, stacklevel=3)
            return
        self._refusals.append(msg)
        _REFUSED.add(self)
        _raise_after_backward()

    def _take_refusals(self) -> list[str]:
        out, self._refusals = self._refusals, []
        return out

    def _backward_batches(self, lookups: list[GroupLookups], batch_size: int, grad_output: Tensor,
                          path: UpdatePath) -> tuple[list[GroupBatch], str, Tensor | None]:
        """Each dim group's batch with its bags' output gradients, what is non-finite
        ("" if nothing), and -- checked on the device instead -- a 0-d tensor that is 0
        when it is (None: checked on the host). A data-parallel replica gets every
        replica's batch here, and learns whether any replica's gradient is non-finite,
        so all of them apply (or refuse) the same update."""
        batches = [GroupBatch(lk if self.replicas is None else lk.compact(), self._bag_grads(g, grad_output, batch_size))
                   for g, lk in zip(self.layout.groups, lookups)]
        if path.device_checks and self.replicas is None and not self._capture_next:
            return batches, "", self._checks.nonfinite(grad_output, self.optimizer_step + 1)
        bad = nonfinite_features(self.layout, grad_output, self._feature_cols)
        if self.replicas is None:
            return batches, ", ".join(bad), None
        batches, bad_replicas = self.replicas.gather(batches, bool(bad))
        others = [r for r in bad_replicas if r != self.replicas.index]
        tables = ", ".join(repr(n) for n in dict.fromkeys(t.table_name for t in self.layout.tables))
        what = ([", ".join(bad)] if bad else []) + (
            [f"data-parallel replica(s) {others} of table(s) {tables}"] if others else [])
        return batches, " and ".join(what), None

    # ------------------------------------------------------ Helen (sharpness)
    def capture_next_backward(self) -> None:
        """The next backward records the touched rows' gradients and updates nothing
        (no weight, state or step change): Helen's first pass."""
        self._capture_next = True
        self._refuse_next_update = False
        self.captured = []
        self._groupings = {}

    def _capture(self, batches: list[GroupBatch]) -> None:
        self._capture_next = False
        counts = self._slot_buffer(COUNT)
        for gi, (g, batch) in enumerate(zip(self.layout.groups, batches)):
            if not g.features or batch.lookups.indices.numel() == 0:
                continue
            lk = batch.lookups.compact()
            if self._fused is not None:  # CPU: g_r and its norm in one C++ pass, into reused buffers
                rows, occurrences, grad = self._fused.coalesce(
                    lk.indices, lk.offsets, lk.per_sample_weights, self.pooling, g.num_rows, batch.bag_grads, f"capture/{gi}")
                dense = reused_rows(self._captured_grads, gi, rows.numel(), g.dim)
                norm = self._fused.row_norms(rows, grad, dense)
            else:
                rows, occurrences, grad = self._sorted_lookups(lk, batch.bag_grads)
                dense = grad.materialize()
                norm = dense.norm(dim=1)
            # the second pass's update reuses this grouping if its lookups are these (checked there)
            self._groupings[gi] = CapturedGrouping.of(lk.indices, lk.offsets, lk.per_sample_weights, rows, occurrences,
                                                      grad)
            starts, tables = self._group_tables(g, rows.device)
            c = counts[g.row_start : g.row_start + g.num_rows].index_select(0, rows) + occurrences
            self.captured.append(CapturedRows(gi, rows, c, tables, table_segments(rows, starts), norm, dense))

    def _counts_version(self) -> int | None:
        """The count buffer's version when the running per-table max is current, else None."""
        buf = self._slot_buffer(COUNT) if any(s.name == COUNT for s in self._slots) else None
        return buffer_version(buf) if buf is not None and self._count_peaks.valid_for(buf) else None

    def _fold_count_peaks(self, g: DimGroup, rows: Tensor, version_before: int | None) -> None:
        """Keep the running max count current through an update of ``rows`` (a no-op
        until Helen first asks for it)."""
        if version_before is None:
            return
        if not counts_only_grow(self.chain):
            self._count_peaks.invalidate()
            return
        starts, tables = self._group_tables(g, rows.device)
        new = self._slot_buffer(COUNT)[g.row_start : g.row_start + g.num_rows].index_select(0, rows)
        peaks = torch.segment_reduce(new, "max", lengths=table_segments(rows, starts), unsafe=True, initial=0)
        self._count_peaks.fold(self._slot_buffer(COUNT), version_before, tables, peaks)

    def stored_count_peaks(self) -> Tensor:
        """[T] max stored c_r of each kernel table (running, see ``sharpness.CountPeaks``)."""
        lay = self.layout
        return self._count_peaks.get(self._slot_buffer(COUNT), list(lay.row_start),
                                     [t.num_rows for t in lay.tables])

    def local_max_counts(self) -> dict[str, float]:
        """max c_r per table on this rank, counting the captured batch (for rho_r)."""
        peak = self.stored_count_peaks().clone()
        for cap in self.captured:
            peak[cap.tables] = torch.maximum(peak[cap.tables], cap.table_peaks().to(peak.dtype))
        out: dict[str, float] = {}
        for spec, c in zip(self.layout.tables, peak.tolist()):
            out[spec.table_name] = max(out.get(spec.table_name, 0.0), c)
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
            if self._fused is not None:  # CPU: save and perturb each row in one pass
                values = self._fused.perturb(w, cap.rows, cap.grad, scale, cap.group)
                self._perturbed.append(SavedRows(w, cap.rows, values, self._fused))
                continue
            self._perturbed.append(SavedRows(w, cap.rows, w.index_select(0, cap.rows)))
            w.index_add_(0, cap.rows, (cap.grad * scale.unsqueeze(1)).to(w.dtype))
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
        lk = lk.compact()
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
            kappa = self._kappa_host[g.tables[0]]
            table = torch.full_like(rows, g.tables[0]) if (self._fal is not None and self._fal.tau_is_ratio) else None
            return torch.full((rows.numel(), 1), self.learning_rate * kappa, device=rows.device), table
        starts, tables = self._group_tables(g, rows.device)
        table = tables[torch.searchsorted(starts, rows, right=True) - 1]
        return (self.learning_rate * self._table_kappa[table]).unsqueeze(1), table

    def _device_const(self, name: str, values: Sequence[int], device: torch.device) -> Tensor:
        """``values`` as an int64 tensor on ``device``, made once per device (a host-to-device
        copy in every step would wait for the device)."""
        key = (name, device)
        hit = self._const_cache.get(key)
        if hit is None:
            hit = self._const_cache[key] = torch.tensor(values, dtype=torch.long, device=device)
        return hit

    def _group_tables(self, g: DimGroup, device: torch.device) -> tuple[Tensor, Tensor]:
        """The group's table row starts and table indices on ``device``, made once (a
        host-to-device copy in every step would wait for the device)."""
        return (self._device_const(f"row_starts{g.row_start}", g.table_row_starts, device),
                self._device_const(f"tables{g.row_start}", g.tables, device))
