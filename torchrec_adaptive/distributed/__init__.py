"""TorchRec integration (written against torchrec 1.8.0): sharder, sharded EBC, planner helpers.

Typical use::

    apply_optimizer_in_backward(torchrec_adaptive.AdamAR, ebc.parameters(), {"lr": 1e-3, "alpha": 1e-3})
    model = DistributedModelParallel(model, sharders=torchrec_adaptive.distributed.sharders(), device=device)

With no plan, TorchRec's planner plans our tables ``fused`` and the sharded module
runs them on our kernel (``module_sharding_plan`` then says ``customized_kernel``;
DMP's own ``plan`` keeps what the planner said). ``plan(model, pg)`` gives a plan
that names ``customized_kernel`` up front.

Supported for our tables: table_wise, row_wise, column_wise, table_column_wise,
table_row_wise, on CPU (gloo) and, untested here, CUDA. Not supported: data_parallel
and grid_shard (the sharder does not offer them unless ``offer_data_parallel=True``,
and then only for other tables). Exact parity with one process holds for every rule
except where a rule reduces over a whole row or table that the plan splits:
RowWiseAdagrad's accumulator under column-wise sharding is the mean over the shard's
own columns (FBGEMM behaves the same), and FAL's quantile threshold
(``fal_tau_is_ratio``) is taken over the rows of the local shard.

Checkpoints: ``checkpoint.save(model, path)`` / ``checkpoint.load(model, path)`` are
``torch.distributed.checkpoint`` with a check first (every key present, same global
shapes, same optimizer per table; a clear ``ValueError`` otherwise and nothing
loaded). A checkpoint loads under another plan or world size (resharding).
"""

from . import checkpoint
from .embeddingbag import (
    AdaptiveEmbeddingBagCollectionSharder,
    ShardedAdaptiveEmbeddingBagCollection,
    adaptive_table_names,
    sharders,
)
from .kernel import ADAPTIVE_RULE_KEY, AdaptiveBatchedEmbeddingBag, AdaptiveFusedOptimizer
from .planner import (
    AdaptiveKernelEstimator,
    adaptive_constraints,
    adaptive_planner,
    compute_time_factor,
    optimizer_state_bytes,
    plan,
)

__all__ = [
    "ADAPTIVE_RULE_KEY",
    "AdaptiveBatchedEmbeddingBag",
    "AdaptiveEmbeddingBagCollectionSharder",
    "AdaptiveFusedOptimizer",
    "AdaptiveKernelEstimator",
    "ShardedAdaptiveEmbeddingBagCollection",
    "adaptive_constraints",
    "adaptive_planner",
    "adaptive_table_names",
    "checkpoint",
    "compute_time_factor",
    "optimizer_state_bytes",
    "plan",
    "sharders",
]
