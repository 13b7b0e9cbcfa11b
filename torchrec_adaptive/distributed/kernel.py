"""TorchRec-side wrapper of our fused kernel: what one shard group runs.

Written against torchrec 1.8.0 (``torchrec/distributed/batched_embedding_kernel.py``
and ``embedding_lookup.py``). TorchRec builds one kernel module per group of
tables that share compute kernel, pooling and fused params; for
``EmbeddingComputeKernel.CUSTOMIZED_KERNEL`` its stock lookup raises, so
:class:`AdaptiveGroupedPooledEmbeddingsLookup` builds
:class:`ShardedAdaptiveTBE` there and defers every other kernel to TorchRec.

:class:`ShardedAdaptiveTBE` is shaped like TorchRec's
``BatchedFusedEmbeddingBag`` (a ``BaseBatchedEmbeddingBag`` + ``FusedOptimizerModule``)
so that the rest of TorchRec (state_dict as ShardedTensors, ``fused_optimizer``,
``named_parameters_by_table``) treats it the same way as FBGEMM's TBE.

A data-parallel group (``sharding_type=DATA_PARALLEL``) is one replica of whole
tables: its kernel gathers every replica's batch in backward (``replicated.py``), and
its fused optimizer is :class:`ReplicatedFusedOptimizer` (plain tensors, no shards).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag, EmbeddingFusedOptimizer
from torchrec.distributed.composable.table_batched_embedding_slice import TableBatchedEmbeddingSlice
from torchrec.distributed.embedding_types import GroupedEmbeddingConfig
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import DataType, pooling_type_to_pooling_mode
from torchrec.optim.fused import EmptyFusedOptimizer, FusedOptimizer, FusedOptimizerModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode

from ..kernels.batched import AdaptiveTBE
from ..kernels.inputs import KernelOptions
from ..kernels.layout import TableSpec
from ..rules.configs import RuleConfig
from ._torchrec_compat import GroupedLookupHooks, mark_updated_in_backward
from .replicated import DataParallelReplicas

# Key under which the sharded module passes each table's RuleConfig to the kernel,
# inside TorchRec's per-table ``fused_params`` (see embeddingbag.py).
ADAPTIVE_RULE_KEY = "torchrec_adaptive_rule"
# Key of each table's KernelOptions (bounds_check, nonfinite, backend, ...) in the same fused params;
# in the sharder's own fused params, the defaults for tables whose kwargs do not set them.
ADAPTIVE_OPTIONS_KEY = "torchrec_adaptive_options"


def rule_of(config: GroupedEmbeddingConfig) -> RuleConfig:
    """The RuleConfig a CUSTOMIZED_KERNEL group was planned with."""
    rule = (config.fused_params or {}).get(ADAPTIVE_RULE_KEY)
    if not isinstance(rule, RuleConfig):
        names = [t.name for t in config.embedding_tables]
        raise ValueError(
            f"tables {names} are planned with compute kernel 'customized_kernel' but have no torchrec_adaptive "
            "optimizer; use apply_optimizer_in_backward(torchrec_adaptive.<Rule>, ...) on them, or plan them 'fused'"
        )
    return rule


def options_of(config: GroupedEmbeddingConfig) -> KernelOptions:
    """The KernelOptions a CUSTOMIZED_KERNEL group was planned with (defaults if none)."""
    options = (config.fused_params or {}).get(ADAPTIVE_OPTIONS_KEY)
    return options if isinstance(options, KernelOptions) else KernelOptions()


# Each table's entry for the step k in the fused optimizer's state dict, and the key
# inside it that names the optimizer that wrote it (checked on load).
STEP_SLOT = "optimizer_step"
OPTIMIZER_NAME_KEY = "optimizer"
# The epoch (FAL's m_r(e)) travels next to k, so a DCP checkpoint restores it. Checkpoints
# written before it was saved lack it: see :func:`drop_absent_epochs`.
EPOCH_KEY = "epoch"


class OptimizerStep:
    """The kernel's global step k, in TorchRec's "stateful" protocol so that
    ``KeyedOptimizer.state_dict``/``load_state_dict`` (and DCP) save and restore it.

    It also records which optimizer wrote the state (``"AdamAR"``, ...): loading
    another optimizer's state (Adam's moments into AdamAR, whose slots have the same
    names) raises instead of silently training on foreign state. (A stock TorchRec
    checkpoint has no such entry: ``checkpoint.load(..., from_stock=True)``.)
    """

    def __init__(self, module: AdaptiveTBE, table: str) -> None:
        self._module = module
        self._table = table

    def state_dict(self) -> Dict[str, Any]:
        return {"step": torch.tensor(self._module.optimizer_step, dtype=torch.int64),
                EPOCH_KEY: torch.tensor(self._module.epoch, dtype=torch.int64),
                OPTIMIZER_NAME_KEY: self._module.rule.name}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        mine = self._module.rule.name
        theirs = state_dict.get(OPTIMIZER_NAME_KEY, mine)
        if theirs != mine:
            raise ValueError(f"table {self._table!r}: the optimizer state was written by {theirs!r}, "
                             f"this model trains the table with {mine!r}; nothing of this table was loaded")
        if "step" not in state_dict:
            raise ValueError(f"table {self._table!r}: the optimizer state has no step k ('{self._table}.{STEP_SLOT}')")
        self._module.set_optimizer_step(int(state_dict["step"]))
        if EPOCH_KEY in state_dict:  # absent in checkpoints written before the epoch was saved
            self._module.restore_epoch(int(state_dict[EPOCH_KEY]))


def drop_absent_epochs(state: Dict[str, Any], saved_keys: Any) -> Dict[str, Any]:
    """``state`` (what ``checkpoint.state_dict`` builds) without the epoch entries that a
    checkpoint written before the epoch was saved does not hold (``saved_keys``: its flat
    DCP keys): such a checkpoint loads, and the model keeps the epoch it has."""
    for param_key, slots in state.get("optim", {}).get("state", {}).items():
        for slot, value in slots.items():
            if (slot.endswith(f".{STEP_SLOT}") and isinstance(value, dict) and EPOCH_KEY in value
                    and f"optim.state.{param_key}.{slot}.{EPOCH_KEY}" not in saved_keys):
                del value[EPOCH_KEY]
    return state


class AdaptiveFusedOptimizer(EmbeddingFusedOptimizer):
    """TorchRec's ``EmbeddingFusedOptimizer`` with the optimizer step.

    TorchRec's class works unchanged on our kernel (it only calls
    ``split_embedding_weights``, ``get_optimizer_state``, ``get/set_learning_rate``,
    ``set_optimizer_step`` and ``update_hyper_parameters``). It names each table's
    first state ``momentum1``, FBGEMM's name; our slots use FBGEMM's names and order
    (``rules/slot_names.py``), so that first state is our ``momentum1`` and the keys are
    the same as a stock table's (a rule whose first slot is not ``momentum1`` gets its
    own name back below). It also never saves the step
    k (FBGEMM keeps it in a buffer); AdamAR's bias corrections and idle gaps depend
    on it, so each table gets ``<table>.optimizer_step`` (identical on every rank).
    """

    def __init__(self, config: GroupedEmbeddingConfig, emb_module: AdaptiveTBE,
                 pg: Optional[dist.ProcessGroup] = None, **kwargs: Any) -> None:
        super().__init__(config, emb_module, pg, **kwargs)  # type: ignore[arg-type]
        self._adaptive_module = emb_module
        first_key = next(iter(emb_module.get_optimizer_state()[0]), None) if config.embedding_tables else None
        for weight, table_state in self.state.items():
            if not table_state:
                continue
            table = next(iter(table_state)).rpartition(".")[0]
            # The step entry first: KeyedOptimizer loads entries in this order, so a
            # state written by another optimizer is refused before any slot is copied.
            renamed: Dict[str, Any] = {f"{table}.{STEP_SLOT}": OptimizerStep(emb_module, table)}
            for key, value in table_state.items():
                _, _, slot = key.rpartition(".")
                renamed[f"{table}.{first_key}" if slot == "momentum1" and first_key else key] = value
            self.state[weight] = renamed

    def set_optimizer_step(self, step: int) -> None:
        self._adaptive_module.set_optimizer_step(step)


class ReplicatedFusedOptimizer(FusedOptimizer):
    """The fused optimizer of a data-parallel group: same keys and names as
    :class:`AdaptiveFusedOptimizer`, but plain tensors.

    TorchRec's ``EmbeddingFusedOptimizer`` builds ShardedTensors from each table's shard
    metadata, which data-parallel tables do not have (it asserts). Every replica holds
    the whole table and its whole state, so ``state_dict`` holds them as they are, like
    TorchRec's own data-parallel weights (DCP writes a replicated tensor once).
    """

    def __init__(self, config: GroupedEmbeddingConfig, emb_module: AdaptiveTBE,
                 create_for_table: Optional[str] = None, param_weight_for_table: Optional[torch.Tensor] = None) -> None:
        self._adaptive_module = emb_module
        params: Dict[str, torch.Tensor] = {}
        state: Dict[Any, Any] = {}
        for t, weight, slots in zip(config.embedding_tables, emb_module.split_embedding_weights(),
                                    emb_module.get_optimizer_state()):
            if create_for_table is not None and t.name != create_for_table:
                continue
            if create_for_table is not None:
                assert param_weight_for_table is not None, "create_for_table needs param_weight_for_table"
                weight, key = param_weight_for_table, ""
            else:
                key = f"{t.name}.weight"
            params[key] = weight
            # The step entry first, as in AdaptiveFusedOptimizer (foreign state is refused before any copy).
            state[weight] = {f"{t.name}.{STEP_SLOT}": OptimizerStep(emb_module, t.name),
                             **{f"{t.name}.{slot}": value for slot, value in slots.items()}}
        super().__init__(params, state, [{"params": list(params.values()), "lr": emb_module.get_learning_rate()}])

    def zero_grad(self, set_to_none: bool = False) -> None:
        self._adaptive_module.set_learning_rate(self.param_groups[0]["lr"])

    def step(self, closure: Any = None) -> None:
        self._adaptive_module.set_learning_rate(self.param_groups[0]["lr"])

    def set_optimizer_step(self, step: int) -> None:
        self._adaptive_module.set_optimizer_step(step)


def _pooling(mode: PoolingMode) -> str:
    if mode == PoolingMode.SUM:
        return "sum"
    if mode == PoolingMode.MEAN:
        return "mean"
    raise ValueError(f"torchrec_adaptive's kernel pools with sum or mean, got {mode}")


class ShardedAdaptiveTBE(BaseBatchedEmbeddingBag[torch.Tensor], FusedOptimizerModule):
    """One group of table shards on one rank, run by ``AdaptiveTBE``.

    Mirrors torchrec 1.8.0's ``BatchedFusedEmbeddingBag``: the flat weight buffer is
    exposed per table (``named_parameters_by_table``) as ``TableBatchedEmbeddingSlice``
    parameters marked as updated in backward by a per-table view of the fused optimizer
    (how TorchRec keeps them away from dense optimizers and DDP). It reads only public
    fields of TorchRec's base class (``config``, each table config's init bounds).
    Under ``DATA_PARALLEL`` the group is one replica (see the module docstring).
    """

    def __init__(self, config: GroupedEmbeddingConfig, pg: Optional[dist.ProcessGroup] = None,
                 device: Optional[torch.device] = None, sharding_type: Optional[ShardingType] = None) -> None:
        super().__init__(config, pg, device, sharding_type)
        self._adaptive_pg = pg
        if config.data_type != DataType.FP32:
            raise ValueError(f"torchrec_adaptive's kernel holds FP32 tables, got {config.data_type} "
                             f"for {[t.name for t in config.embedding_tables]}")
        counts = Counter(t.name for t in config.embedding_tables)
        seen: Counter[str] = Counter()
        specs: List[TableSpec] = []
        feature_table_map: List[int] = []
        for i, t in enumerate(config.embedding_tables):
            feature_table_map.extend([i] * t.num_features())
            lo, hi = t.get_weight_init_min(), t.get_weight_init_max()
            # Several column shards of one table can land in one group: kernel names must be unique.
            name = t.name if counts[t.name] == 1 else f"{t.name}#{seen[t.name]}"
            seen[t.name] += 1
            offsets = t.local_metadata.shard_offsets if t.local_metadata is not None else [0, 0]
            specs.append(TableSpec(name=name, num_rows=t.local_rows, dim=t.local_cols, global_name=t.name,
                                   row_offset=int(offsets[0]), col_offset=int(offsets[1]),
                                   global_num_rows=t.num_embeddings, global_dim=t.embedding_dim,
                                   # the table's own U(lo, hi): initial values and MEDA's re-init use it
                                   init_bounds=(float(lo), float(hi))))

        options = options_of(config)
        self._adaptive_kernel: AdaptiveTBE = AdaptiveTBE(
            specs, rule_of(config), feature_table_map=feature_table_map,
            pooling=_pooling(pooling_type_to_pooling_mode(config.pooling, sharding_type)), device=device,
            **options.kernel_kwargs(),
        )
        if sharding_type == ShardingType.DATA_PARALLEL:
            self._adaptive_kernel.replicas = DataParallelReplicas(pg)
        self._adaptive_optim = self._fused_optimizer_for()

    def _fused_optimizer_for(self, table: Optional[str] = None, weight: Optional[torch.Tensor] = None
                             ) -> FusedOptimizer:
        """The whole group's fused optimizer, or one table's view of it (``table``, ``weight``)."""
        if self._adaptive_kernel.replicas is not None:
            return ReplicatedFusedOptimizer(self.config, self._adaptive_kernel, create_for_table=table,
                                            param_weight_for_table=weight)
        return AdaptiveFusedOptimizer(self.config, self._adaptive_kernel, self._adaptive_pg, create_for_table=table,
                                      param_weight_for_table=weight)

    @property
    def emb_module(self) -> AdaptiveTBE:  # type: ignore[override]
        return self._adaptive_kernel

    @property
    def fused_optimizer(self) -> FusedOptimizer:
        return self._adaptive_optim

    def forward(self, features: KeyedJaggedTensor, vbe_output: Optional[torch.Tensor] = None,  # type: ignore[override]
                vbe_output_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
        if features.variable_stride_per_key():  # refused with the feature names before input dist (inputs.py)
            raise NotImplementedError("torchrec_adaptive's kernel does not take variable batch sizes per feature (VBE)")
        weights = features.weights_or_none()
        if weights is not None and not torch.is_floating_point(weights):
            # Not the user's weights (non-float ones are refused before input dist, inputs.py):
            # TorchRec's row-wise input dist carries positions here for feature processors,
            # which TorchRec's own fused kernel drops the same way.
            weights = None
        return self._adaptive_kernel(features.values(), features.offsets(), weights)

    def named_parameters_by_table(self) -> Iterator[Tuple[str, TableBatchedEmbeddingSlice]]:  # type: ignore[override]
        """One slice per table name (TorchRec's public accessor; the column shards of one table
        are adjacent in the buffer), each marked as updated in backward by its fused optimizer."""
        lay = self._adaptive_kernel.layout
        flat = self._adaptive_kernel.weights.detach()
        tables = self.config.embedding_tables
        for name in dict.fromkeys(t.name for t in tables):
            idx = [i for i, t in enumerate(tables) if t.name == name]
            start = lay.elem_start[idx[0]]
            end = start
            for i in idx:
                if lay.elem_start[i] != end:
                    raise RuntimeError(f"shards of table {name!r} are not contiguous in the kernel's buffer")
                end += lay.tables[i].num_rows * lay.tables[i].dim
            weight = TableBatchedEmbeddingSlice(data=flat, start_offset=start, end_offset=end,
                                                num_embeddings=-1, embedding_dim=lay.tables[idx[0]].dim)
            mark_updated_in_backward(weight, self._fused_optimizer_for(name, weight))
            yield name, weight

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[Tuple[str, torch.Tensor]]:
        """Optimizer state lives in the fused optimizer, as for TorchRec's fused kernels."""
        yield from ()

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[Tuple[str, nn.Parameter]]:
        """Per-table weights, marked as updated in backward (same as ``BatchedFusedEmbeddingBag``)."""
        for name, tensor in self.named_split_embedding_weights(prefix, recurse, remove_duplicate):
            param = nn.Parameter(tensor)
            mark_updated_in_backward(param, EmptyFusedOptimizer())
            yield name, param

    def flush(self) -> None:
        self._adaptive_kernel.flush()


class AdaptiveGroupedPooledEmbeddingsLookup(GroupedLookupHooks):
    """TorchRec's pooled lookup, building our kernel for CUSTOMIZED_KERNEL groups only."""

    def create_customized_kernel(self, config: GroupedEmbeddingConfig, device: Optional[torch.device],
                                 pg: Optional[dist.ProcessGroup], sharding_type: Optional[ShardingType]) -> nn.Module:
        return ShardedAdaptiveTBE(config=config, pg=pg, device=device, sharding_type=sharding_type)


__all__ = [
    "ADAPTIVE_OPTIONS_KEY",
    "ADAPTIVE_RULE_KEY",
    "ShardedAdaptiveTBE",
    "AdaptiveFusedOptimizer",
    "AdaptiveGroupedPooledEmbeddingsLookup",
    "ReplicatedFusedOptimizer",
    "rule_of",
]
