"""TorchRec integration (written against torchrec 1.8.0): sharder, sharded EBC, planner helpers.

Typical use::

    apply_optimizer_in_backward(torchrec_adaptive.AdamAR, ebc.parameters(), {"lr": 1e-3, "alpha": 1e-3})
    model = DistributedModelParallel(model, sharders=torchrec_adaptive.distributed.sharders(), device=device)

With no plan, TorchRec's planner plans our tables ``fused`` and the sharded module
runs them on our kernel (``module_sharding_plan`` then says ``customized_kernel``;
DMP's own ``plan`` keeps what the planner said). ``plan(model, pg)`` gives a plan
that names ``customized_kernel`` up front.

Supported for our tables: table_wise, row_wise, column_wise, table_column_wise,
table_row_wise and data_parallel, on CPU (gloo) and, untested here, CUDA. Not
supported: grid_shard (the sharder does not offer it). Exact parity with one process
holds for every rule except where a rule reduces over a whole row or table that the
plan splits: RowWiseAdagrad's accumulator under column-wise sharding is the mean over
the shard's own columns (FBGEMM behaves the same), and FAL's quantile threshold
(``fal_tau_is_ratio``) is taken over the rows of the local shard.

data_parallel (``replicated.py``): every rank holds the whole table and its optimizer
state and looks up its own batch; in backward each replica all-gathers every rank's
lookup ids, bag lengths, per-sample weights and pooled-output gradients and applies
the single-process update of the global batch, so the replicas stay bit-identical
(same step k, c_r, s_r) and the table trains as under any other plan: the gathered
gradients are divided by the world size exactly when TorchRec's model-parallel
shardings divide theirs (``comm_ops.get_gradient_division()``). Stock TorchRec
data-parallel tables get DDP's average instead (the same while gradient division is
on, the default). DDP never holds our data-parallel weights; Helen and MEDA work on
them (Helen captures the gathered gradient; MEDA's re-init is a hash of global
row/column, identical on every replica), and ``row_statistics`` counts them once. The
sharder offers data_parallel by default (``sharders(offer_data_parallel=False)`` keeps
every table of the EBC model-parallel); TorchRec's planner costs it as DDP's
all-reduce of the table, :func:`adaptive_planner` / :func:`plan` as what our replicas
do (all-gather of the batch, whole table and state on every rank). Per step a
replica sends its batch's gradients to every other rank and runs the backward of the
global batch, so data_parallel suits small, hot tables.

TorchRec internals: only ``_torchrec_compat.py`` names them (each with a canary test in
tests/distributed/test_torchrec_compat.py); importing this package checks that the
installed TorchRec is in ``_torchrec_compat.SUPPORTED_TORCHREC`` (1.8.x) and raises
``UnsupportedTorchRecVersion`` otherwise. ``DistributedModelParallel.reshard`` is refused
for modules holding our tables (reshard through a checkpoint). Map: docs/architecture.md.

Checkpoints: ``checkpoint.save(model, path)`` / ``checkpoint.load(model, path)`` are
``torch.distributed.checkpoint``, all or nothing. The save is atomic (a temporary
folder, a manifest of every file's size and SHA-256, then a rename): a process killed
at any moment of it leaves every earlier checkpoint loadable, and the one being written
either complete or absent. The load checks first (files against the manifest, every key
present, same global shapes, same optimizer per table, no table the model lacks; a clear
``CheckpointError``, a ``ValueError``, naming the checkpoint and file or table otherwise,
on every rank, and nothing loaded). A checkpoint loads under another plan or world size (resharding), including
data_parallel, whose weights and optimizer state are plain (replicated) tensors.
"""

# First: checks the installed TorchRec against the supported range (a clear ImportError otherwise).
from . import _torchrec_compat  # isort: skip
from . import checkpoint
from ._torchrec_compat import SUPPORTED_TORCHREC, UnsupportedTorchRecVersion
from .embeddingbag import (
    AdaptiveEmbeddingBagCollectionSharder,
    AdaptiveParameterSharding,
    ShardedAdaptiveEmbeddingBagCollection,
    adaptive_table_names,
    sharders,
)
from .kernel import ADAPTIVE_RULE_KEY, ShardedAdaptiveTBE, AdaptiveFusedOptimizer
from .planner import (
    AdaptiveKernelEstimator,
    adaptive_constraints,
    adaptive_planner,
    compute_time_factor,
    data_parallel_gather_bytes,
    optimizer_state_bytes,
    plan,
)
from .replicated import DataParallelReplicas, ReplicatedLookup

__all__ = [
    "ADAPTIVE_RULE_KEY",
    "ShardedAdaptiveTBE",
    "AdaptiveEmbeddingBagCollectionSharder",
    "AdaptiveFusedOptimizer",
    "AdaptiveKernelEstimator",
    "AdaptiveParameterSharding",
    "DataParallelReplicas",
    "ReplicatedLookup",
    "SUPPORTED_TORCHREC",
    "ShardedAdaptiveEmbeddingBagCollection",
    "UnsupportedTorchRecVersion",
    "adaptive_constraints",
    "adaptive_planner",
    "adaptive_table_names",
    "checkpoint",
    "compute_time_factor",
    "data_parallel_gather_bytes",
    "optimizer_state_bytes",
    "plan",
    "sharders",
]
