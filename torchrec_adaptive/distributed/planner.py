"""Planning our tables onto ``customized_kernel`` with TorchRec's planner (torchrec 1.8.0).

Two gaps in the stock planner: nothing tells it which tables need our kernel (the
compute kernels a sharder offers are per sharding type, not per table), and its
default perf estimator raises "Unrecognized or unsupported compute kernel" for
``customized_kernel``. :func:`adaptive_constraints` pins each table's kernel from
its optimizer class, and :class:`AdaptiveKernelEstimator` costs our kernel as
TorchRec's ``fused`` one (same memory traffic: one lookup and one in-place row
update per touched row). The plain route needs neither:
``DistributedModelParallel(model, sharders=sharders())`` plans our tables ``fused``
and the sharded module reroutes them; use the helpers to get a plan that names
``customized_kernel`` explicitly, e.g. to constrain or print it.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.enumerators import GUARDED_COMPUTE_KERNELS, EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.planner.types import ParameterConstraints, ShardEstimator, ShardingOption
from torchrec.distributed.planner.types import SharderDataMap
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from .embeddingbag import adaptive_table_names, sharders

CUSTOMIZED = EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value
FUSED = EmbeddingComputeKernel.FUSED.value
# Sharding types our tables cannot take (see AdaptiveEmbeddingBagCollectionSharder).
_NOT_FOR_OURS = {ShardingType.DATA_PARALLEL.value, ShardingType.GRID_SHARD.value}


def adaptive_constraints(model: nn.Module, constraints: Optional[Dict[str, ParameterConstraints]] = None
                         ) -> Dict[str, ParameterConstraints]:
    """Constraints with our tables on ``customized_kernel`` and all other tables off it.

    User constraints are kept (pooling factors, ...); ``compute_kernels`` is set, and
    our tables' ``sharding_types`` lose data_parallel and grid_shard.
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


class AdaptiveKernelEstimator(ShardEstimator):
    """Runs TorchRec's estimators, costing ``customized_kernel`` options as ``fused``."""

    def __init__(self, topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None,
                 estimators: Optional[List[ShardEstimator]] = None) -> None:
        self._estimators = estimators or [EmbeddingPerfEstimator(topology, constraints),
                                          EmbeddingStorageEstimator(topology, constraints)]

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map: SharderDataMap) -> None:
        ours = [so for so in sharding_options if so.compute_kernel == CUSTOMIZED]
        for so in ours:
            so.compute_kernel = FUSED
        try:
            for estimator in self._estimators:
                estimator.estimate(sharding_options, sharder_data_map)
        finally:
            for so in ours:
                so.compute_kernel = CUSTOMIZED


def adaptive_planner(model: nn.Module, topology: Topology, *, batch_size: int = 512,
                     constraints: Optional[Dict[str, ParameterConstraints]] = None) -> EmbeddingShardingPlanner:
    """A TorchRec planner that puts tables with our optimizers on ``customized_kernel``.

    Plan with ``sharders(offer_customized_kernel=True, offer_data_parallel=True)`` (see :func:`plan`).
    """
    cons = adaptive_constraints(model, constraints)
    estimator = AdaptiveKernelEstimator(topology, cons)
    enumerator = EmbeddingEnumerator(topology, batch_size, cons, estimator=estimator)
    return EmbeddingShardingPlanner(topology=topology, batch_size=batch_size, constraints=cons,
                                    enumerator=enumerator, debug=False)


def plan(model: nn.Module, pg: dist.ProcessGroup, *, compute_device: str = "cpu", batch_size: int = 512,
         constraints: Optional[Dict[str, ParameterConstraints]] = None) -> ShardingPlan:
    """Collective plan for ``model`` over ``pg`` (every rank must call it), our tables on ``customized_kernel``."""
    topology = Topology(world_size=dist.get_world_size(pg), compute_device=compute_device,
                        local_world_size=dist.get_world_size(pg))
    planner = adaptive_planner(model, topology, batch_size=batch_size, constraints=constraints)
    return planner.collective_plan(model, sharders(offer_customized_kernel=True, offer_data_parallel=True), pg)
