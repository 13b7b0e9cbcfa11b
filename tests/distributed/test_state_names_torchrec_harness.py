"""TorchRec's own state tooling on our tables (torchrec 1.8.0's ``torchrec/distributed/test_utils``), 2 gloo ranks.

* ``test_sharding.compare_opt_local_t`` reads ``<table>.momentum1`` of two models' fused
  optimizers (it failed on our tables with ``KeyError: 'table_0.momentum1'`` before our
  slots took FBGEMM's names). Here it compares stock TorchRec's fused
  ``EXACT_ROWWISE_ADAGRAD`` (FBGEMM) with our ``RowWiseAdagrad`` after both trained from
  the same weights on the same batches: the sums must agree (relative 1e-4; its default
  absolute 1e-4 would exceed the sums themselves), and so must the weights and predictions (TorchRec's ``_compare_models`` / ``_eval_models``).
* ``ModelParallelStateDictBase``'s tests (``test_load_state_dict``,
  ``test_optimizer_load_state_dict``, ``test_load_state_dict_prefix``,
  ``test_params_and_buffers``) run with their own bodies on models of ours: TorchRec
  writes them for its ``create_test_sharder``, which is swapped for our sharder offering
  the one sharding type asked for, and its ``TestSparseNN`` gets our ``RowWiseAdagrad``
  through ``apply_optimizer_in_backward``. The suite is single-rank and hypothesis-driven
  in TorchRec; here each body runs with fixed arguments on 2 ranks (``.hypothesis`` is
  not installed: a stand-in whose ``given`` leaves the body as it is).
"""

from __future__ import annotations

import sys
import types
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist

from .harness import run_ranks

pytestmark = pytest.mark.distributed

RULE_KWARGS = {"lr": 0.1, "eps": 1e-8}
# (test method, sharding type, extra arguments): TorchRec's bodies with fixed arguments.
STATE_DICT_CASES = [
    ("test_optimizer_load_state_dict", "row_wise", {}),
    ("test_optimizer_load_state_dict", "table_wise", {}),
    ("test_load_state_dict", "table_row_wise", {"is_training": True}),
    ("test_load_state_dict", "column_wise", {"is_training": True}),
    ("test_load_state_dict_dp", "data_parallel", {"is_training": True}),
    ("test_load_state_dict_prefix", "row_wise", {"is_training": True}),
    # row-wise: with features permuted across ranks (table-wise on 2 ranks) TorchRec's own sharded EBC has a
    # non-persistent buffer (_features_order_tensor) that this single-rank test does not expect, stock or ours.
    ("test_params_and_buffers", "row_wise", {}),
]


def _without_hypothesis() -> None:
    """TorchRec's test base imports hypothesis for its strategies; the bodies run without it."""
    if "hypothesis" in sys.modules:
        return
    try:
        import hypothesis  # noqa: F401
        return
    except ImportError:
        pass

    def assume(condition: bool) -> None:
        if not condition:
            raise AssertionError("a case this test runs is one TorchRec's assume() rules out")

    strategies = types.ModuleType("hypothesis.strategies")
    strategies.__getattr__ = lambda name: (lambda *a, **k: None)  # type: ignore[attr-defined]
    hyp = types.ModuleType("hypothesis")
    hyp.given = lambda *a, **k: (lambda f: f)  # type: ignore[attr-defined]
    hyp.settings = lambda *a, **k: (lambda f: f)  # type: ignore[attr-defined]
    hyp.assume = assume  # type: ignore[attr-defined]
    hyp.Verbosity = types.SimpleNamespace(verbose=None)  # type: ignore[attr-defined]
    hyp.strategies = strategies  # type: ignore[attr-defined]
    sys.modules["hypothesis"] = hyp
    sys.modules["hypothesis.strategies"] = strategies


def _state_dict_suite(rank: int) -> Any:
    """A ``ModelParallelStateDictBase`` on the running 2-rank gloo group, building models of ours."""
    from .test_torchrec_harness import _import_harness

    _without_hypothesis()
    _import_harness()  # the base imports TorchRec's test_sharding
    from torchrec.distributed.test_utils import test_model_parallel_base as base
    from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward

    import torchrec_adaptive as ta
    from torchrec_adaptive.distributed import AdaptiveEmbeddingBagCollectionSharder

    class OneType(AdaptiveEmbeddingBagCollectionSharder):
        def __init__(self, sharding_type: str) -> None:
            super().__init__()
            self._only = sharding_type

        def sharding_types(self, compute_device_type: str) -> List[str]:
            return [self._only]

    class Suite(base.ModelParallelStateDictBase):
        backend = "gloo"
        adaptive = True  # False: TorchRec's own model (its sharder's fused params name the optimizer)

        def setUp(self) -> None:  # the group exists already (run_ranks); the rest is the base's setUp
            self.device = torch.device("cpu")
            self.batch_size = 20
            self.num_float_features = 10
            self.tables, self.weighted_tables = [], []
            self._create_tables()

        def _create_model(self) -> torch.nn.Module:
            torch.manual_seed(0)  # the same dense weights on both ranks and in both models
            m = super()._create_model()
            if self.adaptive:
                apply_optimizer_in_backward(ta.RowWiseAdagrad, m.sparse.parameters(), dict(RULE_KWARGS))
            return m

    def ours(sharder_type: str, sharding_type: str, kernel_type: str, fused_params: Any = None, **_: Any) -> Any:
        assert sharder_type == "embedding_bag_collection", sharder_type
        return OneType(sharding_type)

    base.create_test_sharder = ours
    suite = Suite()
    suite.setUp()
    return suite


def compare_opt_worker(rank: int) -> Dict[str, Any]:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    from .test_torchrec_harness import _import_harness  # TorchRec's test_sharding, importable from the wheel

    compare_opt_local_t, create_test_sharder = _import_harness().compare_opt_local_t, _import_harness().create_test_sharder

    stock_sharder = create_test_sharder("embedding_bag_collection", "row_wise", "fused",
                                        fused_params={"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                                                      "learning_rate": RULE_KWARGS["lr"], "eps": RULE_KWARGS["eps"]})
    suite = _state_dict_suite(rank)
    from torchrec.distributed.test_utils import test_model_parallel_base as base

    (ours, _), batch = suite._generate_dmps_and_batch([base.create_test_sharder("embedding_bag_collection", "row_wise",
                                                                                 "fused")])
    suite.adaptive = False
    (stock, _), _ = suite._generate_dmps_and_batch([stock_sharder])
    kernels = {type(emb).__name__ for lookup in stock.module.sparse.ebc._lookups for emb in lookup._emb_modules}
    assert kernels == {"BatchedFusedEmbeddingBag"}, kernels
    ours.load_state_dict(stock.state_dict())  # the same weights, dense ones included
    for _ in range(3):
        suite._train_models(stock, ours, batch)
    moved = 0.0
    for t in range(len(suite.tables)):
        # TorchRec's default atol (1e-4) exceeds these sums (mean squared gradients, ~1e-6 here): relative only
        compare_opt_local_t(stock.fused_optimizer, ours.fused_optimizer, t, rtol=1e-4, atol=1e-12)
        mine = ours.fused_optimizer.state_dict()["state"][f"sparse.ebc.embedding_bags.table_{t}.weight"]
        moved = max(moved, mine[f"table_{t}.momentum1"].local_shards()[0].tensor.abs().max().item())
    assert moved > 1e-9, f"the sums stayed zero ({moved:.2g}): compare_opt_local_t would be vacuous"
    suite._eval_models(stock, ours, batch, is_deterministic=False, tolerance=1e-5)
    suite._compare_models(stock, ours, is_deterministic=False, tolerance=1e-5)
    return {"tables": len(suite.tables), "max_sum": moved}


def state_dict_worker(rank: int) -> Dict[str, Any]:
    suite = _state_dict_suite(rank)
    done = []
    for name, sharding_type, extra in STATE_DICT_CASES:
        try:
            getattr(suite, name)(sharder_type="embedding_bag_collection", sharding_type=sharding_type,
                                 kernel_type="fused", **extra)
        except AssertionError as e:
            raise AssertionError(f"{name} {sharding_type}: {e}") from e
        done.append(f"{name} {sharding_type}")
    return {"done": done}


def test_compare_opt_local_t_stock_rowwise_adagrad_vs_ours() -> None:
    results = run_ranks(compare_opt_worker, timeout=300.0)
    assert all(r["tables"] == 4 for r in results), results


def test_model_parallel_state_dict_suite_on_our_tables() -> None:
    results = run_ranks(state_dict_worker, timeout=400.0)
    assert all(len(r["done"]) == len(STATE_DICT_CASES) for r in results), results
