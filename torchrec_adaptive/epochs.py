"""Epoch boundaries: one call tells every embedding table which epoch starts.

``start_epoch(model, epoch, meda=...)`` walks a ``DistributedModelParallel`` (or an
unsharded model) and

* sets the epoch on every adaptive kernel and on our unsharded ``torch.optim``
  front ends (FAL's m_r(e) uses it; a quantile tail threshold is re-estimated);
* re-initializes embedding rows as MEDA does (METHODS.md): our tables, stock
  TorchRec/FBGEMM fused tables (the Pinterest paper compares FAL against exactly
  that), and unsharded ``EmbeddingBagCollection`` tables. New values depend only on
  (seed, epoch, table, global row, column), so every sharding plan and world size
  gets the same table; dense parameters and their optimizer state are untouched.

Epochs count from 1. Calling it again for the current epoch does nothing; going
backwards is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from .kernels.batched import BatchedAdaptiveEmbeddingBag
from .kernels.reinit import hashed_uniform, table_salt
from .rules.optimizers import AdaptiveRowOptimizer
from .rules.slot_names import COUNT, LAST_STEP

_EPOCH_ATTR = "_torchrec_adaptive_epoch"
REINIT_MODES = ("none", "all", "tail")


@dataclass(frozen=True)
class MEDAConfig:
    """How one table is re-initialized at epoch boundaries.

    Args:
        reinit: ``"none"``, ``"all"`` rows, or ``"tail"``: rows with c_r < ``tail_threshold``.
        tail_threshold: the count below which a row is tail (``"tail"`` only).
        every: re-initialize at epochs 1 + every, 1 + 2 * every, ... (1: every epoch after the first).
        reset_state: zero the re-initialized rows' optimizer state (moments, Adagrad sums).
        keep_counts: keep c_r (our tables only; FBGEMM keeps no counts).
        seed: with the epoch, table and global row, the only input of the new values.
    """

    reinit: str = "all"
    tail_threshold: float = 0.0
    every: int = 1
    reset_state: bool = True
    keep_counts: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.reinit not in REINIT_MODES:
            raise ValueError(f"reinit must be one of {REINIT_MODES}, got {self.reinit!r}")
        if self.tail_threshold < 0:
            raise ValueError(f"tail_threshold must be >= 0, got {self.tail_threshold}")
        if self.reinit == "tail" and self.tail_threshold == 0:
            raise ValueError("reinit='tail' needs a tail_threshold > 0 (rows with c_r < threshold are re-initialized)")
        if self.every < 1:
            raise ValueError(f"every must be >= 1, got {self.every}")

    def applies(self, epoch: int) -> bool:
        return self.reinit != "none" and epoch > 1 and (epoch - 1) % self.every == 0


@dataclass
class EpochReport:
    """What ``start_epoch`` did on this rank: rows re-initialized per table (this rank's shards)."""

    epoch: int
    changed: bool
    reinit_rows: dict[str, int] = field(default_factory=dict)


def _meda_for(meda: MEDAConfig | Mapping[str, MEDAConfig] | None, known: set[str]) -> dict[str, MEDAConfig] | MEDAConfig | None:
    if meda is None or isinstance(meda, MEDAConfig):
        return meda
    unknown = sorted(set(meda) - known)
    if unknown:
        raise ValueError(f"MEDA config names unknown table(s) {unknown}; the model's tables are {sorted(known)}")
    for name, cfg in meda.items():
        if not isinstance(cfg, MEDAConfig):
            raise TypeError(f"MEDA config of table {name!r} must be a MEDAConfig, got {type(cfg).__name__}")
    return dict(meda)


def _config(meda: dict[str, MEDAConfig] | MEDAConfig | None, table: str) -> MEDAConfig | None:
    if meda is None or isinstance(meda, MEDAConfig):
        return meda
    return meda.get(table)


# ----------------------------------------------------------------- table walkers
@dataclass
class _TableShard:
    """One shard of one table, wherever it lives, seen the same way by MEDA."""

    name: str
    weight: Tensor  # [local rows, local dim] view, written in place
    row_offset: int
    col_offset: int
    bounds: tuple[float, float]
    states: list[tuple[Tensor, float]]  # per-row or per-element optimizer state and its reset value
    counts: Tensor | None  # c_r, when the optimizer keeps it
    kernel: BatchedAdaptiveEmbeddingBag | None = None
    kernel_table: int = -1


def all_modules(model: nn.Module) -> Iterator[nn.Module]:
    """``model.modules()``, plus what TorchRec's sharded modules keep in plain lists.

    torchrec 1.8.0's ``ShardedEmbeddingBagCollection`` holds its lookups (and so the
    embedding kernels) in a Python list ``_lookups``, invisible to ``modules()``.
    """
    seen: set[int] = set()
    stack = [model]
    while stack:
        for m in stack.pop().modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            yield m
            for lookup in getattr(m, "_lookups", None) or []:
                if isinstance(lookup, nn.Module):
                    stack.append(getattr(lookup, "module", lookup))  # unwrap DDP (data-parallel lookups)


def _our_kernels(model: nn.Module) -> Iterator[BatchedAdaptiveEmbeddingBag]:
    for m in all_modules(model):
        if isinstance(m, BatchedAdaptiveEmbeddingBag):
            yield m


def _stock_fused_shards(model: nn.Module) -> Iterator[_TableShard]:
    """Tables on TorchRec's FBGEMM fused kernels (``BatchedFusedEmbeddingBag``)."""
    try:
        from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag
    except ImportError:  # torchrec not installed: nothing stock to walk
        return
    for m in all_modules(model):
        if not isinstance(m, BaseBatchedEmbeddingBag) or isinstance(getattr(m, "emb_module", None), BatchedAdaptiveEmbeddingBag):
            continue
        emb = m.emb_module
        if not hasattr(emb, "get_optimizer_state"):
            continue
        weights = emb.split_embedding_weights()
        states = emb.get_optimizer_state()
        for i, t in enumerate(m.config.embedding_tables):
            off = t.local_metadata.shard_offsets if t.local_metadata is not None else [0, 0]
            lo, hi = t.weight_init_min, t.weight_init_max
            if lo is None or hi is None:
                b = (1.0 / t.num_embeddings) ** 0.5
                lo, hi = -b, b
            rows = weights[i].shape[0]
            per_row = [(s, 0.0) for s in states[i].values() if s.dim() >= 1 and s.shape[0] == rows]
            yield _TableShard(t.name, weights[i], int(off[0]), int(off[1]), (lo, hi), per_row, None)


def _unsharded_shards(model: nn.Module) -> Iterator[_TableShard]:
    """Tables of unsharded ``EmbeddingBagCollection``s (optimizers applied in backward)."""
    try:
        from torchrec.modules.embedding_modules import EmbeddingBagCollection
    except ImportError:
        return
    for m in model.modules():
        if not isinstance(m, EmbeddingBagCollection):
            continue
        for cfg in m.embedding_bag_configs():
            weight = m.embedding_bags[cfg.name].weight
            lo, hi = cfg.weight_init_min, cfg.weight_init_max
            if lo is None or hi is None:
                b = (1.0 / cfg.num_embeddings) ** 0.5
                lo, hi = -b, b
            states: list[tuple[Tensor, float]] = []
            counts = None
            for opt in getattr(weight, "_in_backward_optimizers", []):
                ours = isinstance(opt, AdaptiveRowOptimizer)
                step = float(opt.param_groups[0].get("step", 0)) if ours else 0.0
                for name, s in opt.state.get(weight, {}).items():
                    if name == COUNT and ours:
                        counts = s
                    elif isinstance(s, Tensor) and s.dim() >= 1 and s.shape[0] == weight.shape[0]:
                        # as in the kernel: s_r restarts at the re-initialization step
                        states.append((s, step if (ours and name == LAST_STEP) else 0.0))
            yield _TableShard(cfg.name, weight.data, 0, 0, (lo, hi), states, counts)


def _kernel_shards(model: nn.Module) -> Iterator[_TableShard]:
    for k in _our_kernels(model):
        for i, (spec, state) in enumerate(zip(k.layout.tables, k.get_optimizer_state())):
            yield _TableShard(spec.table_name, k.split_embedding_weights()[i], spec.row_offset, spec.col_offset,
                              spec.bounds, [], state[COUNT], kernel=k, kernel_table=i)


def table_shards(model: nn.Module) -> list[_TableShard]:
    """Every embedding table shard this rank holds, of any kind."""
    return [*_kernel_shards(model), *_stock_fused_shards(model), *_unsharded_shards(model)]


def _all_table_names(shards: list[_TableShard]) -> set[str]:
    names = {s.name for s in shards}
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list[set[str] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, names)
        names = set().union(*[g for g in gathered if g is not None])
    return names


# --------------------------------------------------------------------- the API
@torch.no_grad()
def start_epoch(model: nn.Module, epoch: int, meda: MEDAConfig | Mapping[str, MEDAConfig] | None = None) -> EpochReport:
    """Start ``epoch`` (from 1) on every embedding table of ``model``; see the module docstring.

    ``meda``: one config for every table, or ``{table name: MEDAConfig}`` (other tables
    are not re-initialized). Collective when torch.distributed is initialized (the
    table names are gathered to validate ``meda``): call it on every rank.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError(f"epochs count from 1, got {epoch!r}")
    current = getattr(model, _EPOCH_ATTR, 0)
    if epoch < current:
        raise ValueError(f"epoch {epoch} is before the current epoch {current}: epochs only go forward")
    shards = table_shards(model)
    configs = _meda_for(meda, _all_table_names(shards))
    if epoch == current:
        return EpochReport(epoch, changed=False)
    setattr(model, _EPOCH_ATTR, epoch)

    for k in _our_kernels(model):
        k.set_epoch(epoch)
    for p in model.parameters():
        for opt in getattr(p, "_in_backward_optimizers", []):
            if isinstance(opt, AdaptiveRowOptimizer):
                opt.set_epoch(epoch)

    report = EpochReport(epoch, changed=True)
    for shard in shards:
        cfg = _config(configs, shard.name)
        if cfg is None or not cfg.applies(epoch):
            continue
        n = _reinit(shard, cfg, epoch)
        if shard.col_offset == 0:  # count rows once, not once per column shard
            report.reinit_rows[shard.name] = report.reinit_rows.get(shard.name, 0) + n
    return report


def _reinit(shard: _TableShard, cfg: MEDAConfig, epoch: int) -> int:
    rows_total = shard.weight.shape[0]
    if cfg.reinit == "tail":
        if shard.counts is None:
            raise ValueError(
                f"table {shard.name!r}: reinit='tail' needs row counts c_r, which only torchrec_adaptive "
                "optimizers keep (FBGEMM's fused optimizers do not); use reinit='all' for this table"
            )
        rows = (shard.counts < cfg.tail_threshold).nonzero().squeeze(1)
    else:
        rows = torch.arange(rows_total, device=shard.weight.device)
    if shard.kernel is not None:
        shard.kernel.reinit_rows(shard.kernel_table, rows, seed=cfg.seed, epoch=epoch,
                                 reset_state=cfg.reset_state, keep_counts=cfg.keep_counts)
        return int(rows.numel())
    cols = torch.arange(shard.col_offset, shard.col_offset + shard.weight.shape[1], device=rows.device)
    values = hashed_uniform(table_salt(cfg.seed, epoch, shard.name), rows + shard.row_offset, cols, *shard.bounds)
    shard.weight.index_copy_(0, rows, values.to(shard.weight.dtype))
    if cfg.reset_state:
        for s, fill in shard.states:
            s.index_fill_(0, rows.to(s.device), fill)
        if shard.counts is not None and not cfg.keep_counts:
            shard.counts.index_fill_(0, rows, 0)
    return int(rows.numel())
