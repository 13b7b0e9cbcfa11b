"""Unsharded = sharded, checked by TorchRec 1.8.0's own harness.

``torchrec.distributed.test_utils.test_sharding.sharding_single_rank_test_single_process``
(shipped in TorchRec's wheel) builds TorchRec's ``TestSparseNN`` twice from one seed,
registers the same ``apply_optimizer_in_backward`` config on both, shards one copy with
the sharders given (here ours, restricted to one sharding type), trains both one step
and asserts that the predictions agree (``torch.testing.assert_close``). The unsharded
copy is TorchRec's plain ``EmbeddingBagCollection``, trained by our optimizer class
as a ``torch.optim.Optimizer`` on dense gradients; the sharded one by our kernel.

FAL makes the test sensitive to how rows are counted: with FAL's tau = 3, a row
counted once where the kernel counts 3 lookups gets a third of the learning rate.

The model has weighted and unweighted tables, a feature shared by two tables, and (in
the MEAN cases) mean pooling. Which cases (runtime kept ~1 min on 2 CPU ranks, see CASES):
AdamAR + FAL on all six of TorchRec's sharding types, and on three with MEAN pooling;
plain AdamAR, Adam and RowWiseAdagrad + FAL on two or three each. Row-wise Adagrad keeps
one accumulator per row over the shard's columns (as FBGEMM does), so it is not run
column-wise (not equal to unsharded by design, see torchrec_adaptive/distributed/__init__.py).
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist

import torchrec_adaptive as ta

from .harness import run_ranks

pytestmark = pytest.mark.distributed

ALL_TYPES = ["table_wise", "row_wise", "column_wise", "table_row_wise", "table_column_wise", "data_parallel"]
ADAMAR = {"lr": 0.05, "alpha": 1e-2, "eps": 0.1}
FAL = {**ADAMAR, "fal_tau": 3.0, "fal_min": 0.05}
# (rule, kwargs, pooling, sharding types)
CASES: List[Tuple[str, Dict[str, Any], str, List[str]]] = [
    ("AdamAR", FAL, "sum", ALL_TYPES),
    ("AdamAR", FAL, "mean", ["row_wise", "column_wise", "data_parallel"]),
    ("AdamAR", ADAMAR, "sum", ["table_wise", "row_wise", "column_wise"]),
    ("Adam", {"lr": 0.05, "eps": 0.1}, "sum", ["table_wise", "table_row_wise"]),
    ("RowWiseAdagrad", {"lr": 0.1, "eps": 0.5, "fal_tau": 3.0}, "sum", ["row_wise", "data_parallel"]),
]


def _tables(pooling: str) -> Tuple[list, list, Dict[str, List[str]]]:
    """TorchRec's ModelParallelTestShared tables, fewer: 4 tables (two share a feature),
    2 weighted tables; one embedding group."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

    pool = PoolingType.MEAN if pooling == "mean" else PoolingType.SUM
    # table_3 shares feature_0 with table_0 and, as in TorchRec's tests, has its size
    # (ModelInput draws a feature's IDs from its first table's range).
    tables = [EmbeddingBagConfig(num_embeddings=(i % 3 + 1) * 10, embedding_dim=(i % 3 + 2) * 8, name=f"table_{i}",
                                 feature_names=[f"feature_{i % 3}"], pooling=pool) for i in range(4)]
    weighted = [EmbeddingBagConfig(num_embeddings=(i + 1) * 10, embedding_dim=(i + 2) * 4, name=f"weighted_table_{i}",
                                   feature_names=[f"weighted_feature_{i}"]) for i in range(2)]
    shared = {"feature_0"}  # looked up by table_0 and table_3
    groups = {"group_0": [f"{f}@{t.name}" if f in shared else f for t in tables for f in t.feature_names]}
    return tables, weighted, groups


def _import_harness() -> Any:
    """TorchRec's ``test_sharding`` module. It imports ``TestEmbeddingCollectionSharder`` from
    ``torchrec.distributed.tests``, which the wheel does not ship, for its 2-D parallel path
    only; a placeholder that refuses to be used stands in for it."""
    import sys
    import types

    name = "torchrec.distributed.tests.test_sequence_model"
    if name not in sys.modules:
        import torchrec.distributed

        class TestEmbeddingCollectionSharder:  # noqa: D401 - placeholder
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                raise RuntimeError("2-D parallel sharding is not part of this test")

        pkg = types.ModuleType("torchrec.distributed.tests")
        pkg.__path__ = []  # type: ignore[attr-defined]
        mod = types.ModuleType(name)
        mod.TestEmbeddingCollectionSharder = TestEmbeddingCollectionSharder  # type: ignore[attr-defined]
        sys.modules.setdefault("torchrec.distributed.tests", pkg)
        sys.modules[name] = mod
        torchrec.distributed.tests = sys.modules["torchrec.distributed.tests"]  # type: ignore[attr-defined]
    from torchrec.distributed.test_utils import test_sharding

    # The harness casts the unsharded weighted tables to float32 by replacing their
    # parameters *after* registering the in-backward optimizers, so those tables would
    # be trained by its SGD instead of the rule under test. Ours are float32 already.
    test_sharding.alter_global_ebc_dtype = _keep_float32_parameters
    return test_sharding


def _keep_float32_parameters(model: torch.nn.Module) -> None:
    for p in model.parameters():
        assert p.dtype == torch.float32, "the harness's float32 cast was skipped on a non-float32 table"


def harness_worker(rank: int) -> Dict[str, Any]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.test_utils.test_model import TestSparseNN


    from torchrec_adaptive.distributed import AdaptiveEmbeddingBagCollectionSharder

    class OneType(AdaptiveEmbeddingBagCollectionSharder):
        """Our sharder offering one sharding type (TorchRec's TestEBCSharder idea)."""

        def __init__(self, sharding_type: str) -> None:
            super().__init__()
            self._only = sharding_type

        def sharding_types(self, compute_device_type: str) -> List[str]:
            return [self._only]

    passed = []
    for rule, kwargs, pooling, types in CASES:
        tables, weighted, groups = _tables(pooling)
        for sharding_type in types:
            try:
                _import_harness().sharding_single_rank_test_single_process(
                    pg=dist.group.WORLD, device=torch.device("cpu"), rank=rank, world_size=2, local_size=2,
                    model_class=TestSparseNN, tables=tables, weighted_tables=weighted, embedding_groups=groups,
                    sharders=[OneType(sharding_type)], optim=EmbOptimType.EXACT_SGD,
                    apply_optimizer_in_backward_config={"embedding_bags": (getattr(ta, rule), dict(kwargs))},
                    batch_size=8,
                )
            except AssertionError as e:
                raise AssertionError(f"{rule} {kwargs} {sharding_type} {pooling}: {e}") from e
            passed.append(f"{rule}{' FAL' if 'fal_tau' in kwargs else ''} {pooling} {sharding_type}")
    return {"passed": passed}


def test_torchrec_harness_unsharded_equals_sharded() -> None:
    results = run_ranks(harness_worker, timeout=300.0)
    assert len(results[0]["passed"]) == sum(len(t) for *_, t in CASES), results
