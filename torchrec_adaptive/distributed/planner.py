"""Planning our tables onto ``customized_kernel`` with TorchRec's planner (torchrec 1.8.0).

Gaps in the stock planner: nothing tells it which tables need our kernel (the
compute kernels a sharder offers are per sharding type, not per table), its default
perf estimator raises "Unrecognized or unsupported compute kernel" for
``customized_kernel``, and its storage estimator assumes one optimizer state the size
of the weights for any optimizer class it does not know (``_get_optimizer_multipler``).
:func:`adaptive_constraints` pins each table's kernel from its optimizer class, and
:class:`AdaptiveKernelEstimator` costs our kernel as TorchRec's ``fused`` one, then
corrects both estimates for our tables: storage from the rule's declared state slots
(:func:`optimizer_state_bytes`), compute time from our kernel's measured bandwidth
(:func:`compute_time_factor`), and, for data_parallel, the backward TorchRec costs as
DDP's all-reduce of the whole table, which our replicas replace by an all-gather of
the batch (:func:`data_parallel_gather_bytes`). The plain route needs none of this:
``DistributedModelParallel(model, sharders=sharders())`` plans our tables ``fused``
and the sharded module reroutes them; use the helpers to get a plan that names
``customized_kernel`` explicitly, e.g. to constrain or print it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.planner.types import CollectiveType, ParameterConstraints, ShardEstimator, ShardingOption
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (HardwareConfig, KernelConfig, SharderDataMap, TopologyFactory,
                                                TrainerConfig)
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from ..rules.configs import AdamConfig, RowWiseAdagradConfig, RuleConfig
from ..rules.optimizers import config_from_optimizer, is_adaptive_optimizer
from ._torchrec_compat import (
    GUARDED_COMPUTE_KERNELS,
    optimizer_class_of,
    optimizer_kwargs_of,
    torchrec_optimizer_bytes,
)
from .embeddingbag import adaptive_table_names, sharders

CUSTOMIZED = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
FUSED = EmbeddingComputeKernel.FUSED.value
DATA_PARALLEL = ShardingType.DATA_PARALLEL.value
# Sharding types our tables cannot take (see AdaptiveEmbeddingBagCollectionSharder).
_NOT_FOR_OURS = {ShardingType.GRID_SHARD.value}


def adaptive_constraints(model: nn.Module, constraints: Optional[Dict[str, ParameterConstraints]] = None
                         ) -> Dict[str, ParameterConstraints]:
    """Constraints with our tables on ``customized_kernel`` and all other tables off it.

    User constraints are kept (pooling factors, ...); ``compute_kernels`` is set, and
    our tables' ``sharding_types`` lose grid_shard (data_parallel stays: our kernel runs
    replicated, ``replicated.py``). Other tables keep TorchRec's kernels (``dense`` is
    the only one TorchRec runs under data_parallel).
    """
    out = dict(constraints or {})
    ours_types = [t.value for t in ShardingType if t.value not in _NOT_FOR_OURS]
    stock_kernels = [k.value for k in EmbeddingComputeKernel if k not in GUARDED_COMPUTE_KERNELS and k.value != CUSTOMIZED]
    for module in model.modules():
        if not isinstance(module, EmbeddingBagCollection):
            continue
        ours = set(adaptive_table_names(module))
        for config in module.embedding_bag_configs():
            base = out.get(config.name, ParameterConstraints())
            if config.name in ours:
                types = [t for t in (base.sharding_types or ours_types) if t not in _NOT_FOR_OURS]
                if not types:
                    raise ValueError(f"table {config.name!r}: torchrec_adaptive tables cannot be "
                                     f"{sorted(_NOT_FOR_OURS)}, and the constraints allow nothing else")
                out[config.name] = dataclasses.replace(base, compute_kernels=[CUSTOMIZED], sharding_types=types)
            else:
                kernels = [k for k in (base.compute_kernels or stock_kernels) if k != CUSTOMIZED]
                out[config.name] = dataclasses.replace(base, compute_kernels=kernels)
    return out


def optimizer_state_bytes(rule: RuleConfig, rows: int, cols: int) -> int:
    """Bytes of optimizer state our kernel keeps for a ``rows x cols`` shard, from the rule's slots.

    AdamAR / Adam: momentum1 and exp_avg_sq per element (2 x 4 B x cols per row) plus
    prev_iter (int64) and row_count (float64) per row; row-wise Adagrad: its sum momentum1
    (float32) plus the same per-row history. A column shard keeps its own per-row slots.
    """
    per_row = 0
    for slot in rule.build().slots():
        size = slot.dtype.itemsize
        per_row += size * cols if slot.per_element else size
    return rows * per_row


# Measured effective bandwidth of one training step on CPU, in GB/s: the bytes a step
# must move divided by the step time. Derived from docs/performance.md, "Kernel step"
# (benchmarks/kernel_step.py, 2026-11-23, 26 x 100k x 64, batch 4096, 2 threads, copy
# bandwidth ~20 GB/s): bandwidth = 20 GB/s / (the table's "x floor" column).
# (pooling factor 1, pooling factor 8) per kernel.
MEASURED_CPU_BANDWIDTH_GBPS: Dict[str, Tuple[float, float]] = {
    "fbgemm_rowwise_adagrad": (20 / 14.7, 20 / 6.9),  # FBGEMM EXACT_ROWWISE_ADAGRAD: 51.9 / 172.2 ms
    "RowWiseAdagrad": (20 / 11.6, 20 / 6.3),  # 41.6 / 159.8 ms
    "Adam": (20 / 6.7, 20 / 4.8),  # 38.4 / 174.3 ms
    "AdamAR": (20 / 7.0, 20 / 4.7),  # 39.7 / 172.2 ms
    "FAL": (20 / 6.4, 20 / 4.6),  # FAL + AdamAR: 36.5 / 167.6 ms
}
# The floors of the two kernels count different bytes (our Adam state is 3 buffers, FBGEMM's
# row-wise Adagrad 1 + 1/dim), so the ratio of step times is what compares them:
# t_ours / t_fbgemm = (floor_ours / bw_ours) / (floor_fbgemm / bw_fbgemm).
_MEASURED_STEP_MS: Dict[str, Tuple[float, float]] = {
    "fbgemm_rowwise_adagrad": (51.9, 172.2),
    "RowWiseAdagrad": (41.6, 159.8),
    "Adam": (38.4, 174.3),
    "AdamAR": (39.7, 172.2),
    "FAL": (36.5, 167.6),
}


def _kernel_family(rule: RuleConfig) -> str:
    if rule.fal is not None:
        return "FAL"
    if isinstance(rule, RowWiseAdagradConfig):
        return "RowWiseAdagrad"
    return rule.name if isinstance(rule, AdamConfig) else "AdamAR"


def compute_time_factor(rule: RuleConfig, pooling_factor: float, compute_device: str) -> float:
    """Our kernel's compute time relative to TorchRec's ``fused`` (FBGEMM) estimate.

    TorchRec costs a CPU ``fused`` table at the DDR bandwidth; FBGEMM's row-wise
    Adagrad and our kernel were measured in the same run (``MEASURED_CPU_BANDWIDTH_GBPS``),
    so our tables get FBGEMM's estimate times the measured step-time ratio, interpolated
    linearly in the pooling factor between the measured 1 and 8 (clamped). That keeps
    our tables and stock FBGEMM tables of one plan on the same scale. CUDA was not
    measured (no GPU in this project's runs): factor 1 there.
    """
    if compute_device != "cpu":
        return 1.0
    ours, stock = _MEASURED_STEP_MS[_kernel_family(rule)], _MEASURED_STEP_MS["fbgemm_rowwise_adagrad"]
    w = min(max((pooling_factor - 1.0) / 7.0, 0.0), 1.0)
    return ((1 - w) * ours[0] + w * ours[1]) / ((1 - w) * stock[0] + w * stock[1])


def _rule_of_option(so: ShardingOption) -> Optional[RuleConfig]:
    cls = optimizer_class_of(so.tensor)
    if not is_adaptive_optimizer(cls):
        return None
    return config_from_optimizer(cls, optimizer_kwargs_of(so.tensor))  # type: ignore[arg-type]


def data_parallel_gather_bytes(dim: int, batch_size: int, input_lengths: List[float],
                               num_poolings: Optional[List[float]], world_size: int, weighted: bool = False) -> int:
    """Bytes one data-parallel replica of our kernel receives per backward (``replicated.py``).

    Each other replica sends its bags' output gradients (fp32, ``dim`` per bag), its
    lookup ids and bag lengths (int64) and, for weighted features, the weights (fp32);
    ``batch_size`` is per rank, as in TorchRec's estimators. Padding is not counted.
    """
    poolings = num_poolings or [1.0] * len(input_lengths)
    bags = batch_size * sum(poolings)
    lookups = batch_size * sum(n * p for n, p in zip(input_lengths, poolings))
    per_rank = bags * (dim * 4 + 8) + lookups * (8 + (4 if weighted else 0))
    return math.ceil((world_size - 1) * per_rank)


class AdaptiveKernelEstimator(ShardEstimator):
    """Runs TorchRec's estimators, costing ``customized_kernel`` options as ``fused``,
    then corrects our options' storage (our optimizer state) and compute time (measured).

    Data-parallel options: TorchRec already counts the whole table and its state on
    every rank (storage is replicated; our state correction applies per replica). Its
    backward is DDP's (all-reduce of the whole table gradient plus a dense optimizer
    pass over it); ours all-gathers the batch and updates the global batch's rows on
    every replica, so ``bwd_comms`` becomes the all-gather time and ``bwd_compute`` is
    TorchRec's local-batch backward times the world size."""

    def __init__(self, topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None,
                 estimators: Optional[List[ShardEstimator]] = None) -> None:
        self._topology = topology
        self._estimators = estimators or [EmbeddingPerfEstimator(topology, constraints),
                                          EmbeddingStorageEstimator(topology, constraints)]

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map: SharderDataMap) -> None:
        # TorchRec's estimators see a copy of each of our options that says ``fused`` (the
        # caller's options are never changed); the copy shares the option's shards, which the
        # estimators fill in, and whatever shard list they leave is taken back.
        ours = [so for so in sharding_options if so.compute_kernel == CUSTOMIZED]
        views = {id(so): copy.copy(so) for so in ours}
        for view in views.values():
            view.compute_kernel = FUSED
        shown = [views.get(id(so), so) for so in sharding_options]
        for estimator in self._estimators:
            estimator.estimate(shown, sharder_data_map)
        for so in ours:
            so.shards = views[id(so)].shards
        for so in ours:
            rule = _rule_of_option(so)
            if rule is not None:
                self._correct(so, rule)

    def _correct(self, so: ShardingOption, rule: RuleConfig) -> None:
        device = self._topology.compute_device
        pooling = sum(so.input_lengths) / max(len(so.input_lengths), 1)
        factor = compute_time_factor(rule, pooling, device)
        world = self._topology.world_size
        shape = so.tensor.shape
        table_bytes = so.tensor.numel() * so.tensor.element_size()
        for shard in so.shards:
            if shard.storage is not None:
                # What TorchRec counted for "the optimizer" (one state the size of the shard
                # for a class it does not know), replaced by what our kernel allocates.
                shard_bytes = math.ceil(table_bytes * math.prod(shard.size) / math.prod(shape))
                theirs = torchrec_optimizer_bytes(shard_bytes, optimizer_class_of(so.tensor), shape)
                delta = optimizer_state_bytes(rule, shard.size[0], shard.size[1]) - theirs
                if device == "cpu":
                    shard.storage = dataclasses.replace(shard.storage, ddr=shard.storage.ddr + delta)
                else:
                    shard.storage = dataclasses.replace(shard.storage, hbm=shard.storage.hbm + delta)
            if shard.perf is not None and factor != 1.0:
                shard.perf = dataclasses.replace(shard.perf, fwd_compute=shard.perf.fwd_compute * factor,
                                                 bwd_compute=shard.perf.bwd_compute * factor)
            if shard.perf is not None and so.sharding_type == DATA_PARALLEL:
                shard.perf = dataclasses.replace(shard.perf, bwd_compute=shard.perf.bwd_compute * world,
                                                 bwd_comms=self._gather_ms(so, shape[1]))

    def _gather_ms(self, so: ShardingOption, dim: int) -> float:
        """The all-gather of a data-parallel backward, at the topology's all-gather bandwidth (bytes/ms)."""
        topology = self._topology
        received = data_parallel_gather_bytes(dim, so.batch_size, so.input_lengths, so.num_poolings,
                                              topology.world_size, bool(so.is_weighted))
        bw = topology.comms_bandwidths.get_bw(local_world_size=topology.local_world_size,
                                              world_size=topology.world_size,
                                              collective_type=CollectiveType.ALL_GATHER)
        return received / bw if bw > 0 else 0.0


def adaptive_planner(model: nn.Module, topology: Topology, *, batch_size: int = 512,
                     constraints: Optional[Dict[str, ParameterConstraints]] = None) -> EmbeddingShardingPlanner:
    """A TorchRec planner that puts tables with our optimizers on ``customized_kernel``.

    Plan with ``sharders(offer_customized_kernel=True, offer_data_parallel=True)`` (see :func:`plan`).
    """
    cons = adaptive_constraints(model, constraints)
    estimator = AdaptiveKernelEstimator(topology, cons)
    enumerator = EmbeddingEnumerator(topology, batch_size, cons, estimator=estimator)
    # TorchRec deprecates its default HeuristicalStorageReservation (it over-estimates dense
    # tensors); the fixed percentage is what it recommends, with the same 15 % margin.
    return EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=cons,
                                    enumerator=enumerator, storage_reservation=FixedPercentageStorageReservation(0.15),
                                    debug=False)


def topology(world_size: int, compute_device: str = "cpu", *, local_world_size: Optional[int] = None,
             hbm_cap: Optional[int] = None) -> Topology:
    """TorchRec's ``Topology`` of a job: ``world_size`` ranks, ``local_world_size`` per host
    (default: torchrun's ``LOCAL_WORLD_SIZE``, else one host), on ``compute_device``.

    The ranks per host decide which collectives TorchRec costs at the intra-host and which
    at the inter-host bandwidth: planned as one host, a 2-host x 8-GPU job would put
    row-wise shards across the slow link as if it were NVLink. On CUDA the HBM per device
    is this machine's GPU memory (``hbm_cap`` overrides it, e.g. to plan for other GPUs
    from here), as TorchRec's own DMP planner takes it. Built through TorchRec's
    ``TopologyFactory``, as it asks; needs no process group (dry runs plan for any job).
    """
    # From torchrun, capped at the group's size (a group smaller than a host plans as one host).
    local = local_world_size if local_world_size is not None else min(
        int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), world_size)
    if local < 1 or world_size % local:
        raise ValueError(f"{local} ranks per host (LOCAL_WORLD_SIZE, or local_world_size) does not divide the "
                         f"world size {world_size}: every host must run the same number of ranks")
    if hbm_cap is None and compute_device == "cuda" and torch.cuda.is_available():
        hbm_cap = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return TopologyFactory.create_topology(TrainerConfig(world_size=world_size, local_world_size=local),
                                           hardware_config=HardwareConfig(hbm_cap_bytes=hbm_cap),
                                           kernel_config=KernelConfig(compute_device=compute_device))


def plan(model: nn.Module, pg: dist.ProcessGroup, *, compute_device: str = "cpu", batch_size: int = 512,
         constraints: Optional[Dict[str, ParameterConstraints]] = None) -> ShardingPlan:
    """Collective plan for ``model`` over ``pg`` (every rank must call it), our tables on ``customized_kernel``,
    for the job's real :func:`topology` (ranks per host from torchrun's ``LOCAL_WORLD_SIZE``)."""
    planner = adaptive_planner(model, topology(dist.get_world_size(pg), compute_device), batch_size=batch_size,
                               constraints=constraints)
    return planner.collective_plan(model, sharders(offer_customized_kernel=True, offer_data_parallel=True), pg)
