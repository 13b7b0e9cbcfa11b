"""The one walk over a model's embedding tables, for MEDA (epochs.py), diagnostics and Helen.

A table shard lives in one of three places, and each consumer used to find them its own
way: our fused kernel (``AdaptiveTBE``, sharded or not), TorchRec's stock
FBGEMM fused kernels (``BaseBatchedEmbeddingBag``), and unsharded
``EmbeddingBagCollection`` tables trained by optimizers applied in backward. TorchRec keeps
a sharded module's lookups in a plain list, so ``model.modules()`` alone misses them;
:func:`all_modules` adds them (through the seam, ``_torchrec_compat.sharded_lookups``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Tuple

from torch import Tensor, nn
from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from ..kernels.batched import AdaptiveTBE
from ..rules.optimizers import AdaptiveRowOptimizer
from ..rules.slot_names import COUNT, LAST_STEP
from ._torchrec_compat import in_backward_optimizers, sharded_lookups


@dataclass
class TableShard:
    """One shard of one table, wherever it lives, seen the same way by MEDA and diagnostics."""

    name: str
    weight: Tensor  # [local rows, local dim] view, written in place
    row_offset: int
    col_offset: int
    bounds: Tuple[float, float]
    states: List[Tuple[Tensor, float]]  # per-row or per-element optimizer state and its reset value
    counts: Optional[Tensor]  # c_r, when the optimizer keeps it
    kernel: Optional[AdaptiveTBE] = None  # our kernel (it re-initializes its own rows)
    kernel_table: int = -1


def all_modules(model: nn.Module) -> Iterator[nn.Module]:
    """``model.modules()``, plus the lookups TorchRec's sharded modules keep in plain lists."""
    seen: set[int] = set()
    stack = [model]
    while stack:
        for m in stack.pop().modules():
            if id(m) in seen:
                continue
            seen.add(id(m))
            yield m
            stack.extend(sharded_lookups(m))


def adaptive_kernels(model: nn.Module) -> List[AdaptiveTBE]:
    """Every one of our fused kernels in ``model`` (sharded or not)."""
    return [m for m in all_modules(model) if isinstance(m, AdaptiveTBE)]


def adaptive_row_optimizers(model: nn.Module) -> Iterator[Tuple[nn.Parameter, AdaptiveRowOptimizer]]:
    """(parameter, optimizer) for unsharded parameters trained by our ``torch.optim`` front ends."""
    for p in model.parameters():
        for opt in in_backward_optimizers(p):
            if isinstance(opt, AdaptiveRowOptimizer):
                yield p, opt


def _kernel_shards(model: nn.Module) -> Iterator[TableShard]:
    for k in adaptive_kernels(model):
        for i, (spec, state) in enumerate(zip(k.layout.tables, k.get_optimizer_state())):
            yield TableShard(spec.table_name, k.split_embedding_weights()[i], spec.row_offset, spec.col_offset,
                             spec.bounds, [], state[COUNT], kernel=k, kernel_table=i)


def _stock_fused_shards(model: nn.Module) -> Iterator[TableShard]:
    """Tables on TorchRec's FBGEMM fused kernels (``BatchedFusedEmbeddingBag``)."""
    for m in all_modules(model):
        if not isinstance(m, BaseBatchedEmbeddingBag) or isinstance(getattr(m, "emb_module", None),
                                                                     AdaptiveTBE):
            continue
        emb: Any = m.emb_module
        if not hasattr(emb, "get_optimizer_state"):
            continue
        weights = emb.split_embedding_weights()
        states = emb.get_optimizer_state()
        for i, t in enumerate(m.config.embedding_tables):
            off = t.local_metadata.shard_offsets if t.local_metadata is not None else [0, 0]
            rows = weights[i].shape[0]
            per_row = [(s, 0.0) for s in states[i].values() if s.dim() >= 1 and s.shape[0] == rows]
            yield TableShard(t.name, weights[i], int(off[0]), int(off[1]),
                             (t.get_weight_init_min(), t.get_weight_init_max()), per_row, None)


def _unsharded_shards(model: nn.Module) -> Iterator[TableShard]:
    """Tables of unsharded ``EmbeddingBagCollection``s (optimizers applied in backward)."""
    for m in model.modules():
        if not isinstance(m, EmbeddingBagCollection):
            continue
        for cfg in m.embedding_bag_configs():
            weight = m.embedding_bags[cfg.name].weight
            states: List[Tuple[Tensor, float]] = []
            counts = None
            for opt in in_backward_optimizers(weight):
                ours = isinstance(opt, AdaptiveRowOptimizer)
                step = float(opt.param_groups[0].get("step", 0)) if ours else 0.0
                for name, s in opt.state.get(weight, {}).items():
                    if name == COUNT and ours:
                        counts = s
                    elif isinstance(s, Tensor) and s.dim() >= 1 and s.shape[0] == weight.shape[0]:
                        # as in the kernel: s_r restarts at the re-initialization step
                        states.append((s, step if (ours and name == LAST_STEP) else 0.0))
            yield TableShard(cfg.name, weight.data, 0, 0,
                             (cfg.get_weight_init_min(), cfg.get_weight_init_max()),
                             states, counts)


def table_shards(model: nn.Module) -> List[TableShard]:
    """Every embedding table shard this rank holds, of any kind."""
    return [*_kernel_shards(model), *_stock_fused_shards(model), *_unsharded_shards(model)]


def unsharded_table_names(model: nn.Module) -> dict[int, str]:
    """id(weight) -> table name for the tables of unsharded EmbeddingBagCollections."""
    return {id(m.embedding_bags[c.name].weight): c.name
            for m in model.modules() if isinstance(m, EmbeddingBagCollection) for c in m.embedding_bag_configs()}


__all__ = ["TableShard", "adaptive_kernels", "adaptive_row_optimizers", "all_modules", "table_shards",
           "unsharded_table_names"]
