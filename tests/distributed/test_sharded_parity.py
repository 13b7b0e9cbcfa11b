"""Sharded training (2 gloo ranks) equals single-process training of the same kernel.

20 steps; weights and every optimizer state (per local shard) to 1e-5. eps is large
(0.1 or 0.5) so the updates are not scale-invariant: a wrong gradient scale across
ranks (TorchRec divides by world size in the output dist backward) would show.

Data-parallel tables (every rank a replica, the global batch gathered in backward) must
equal the same single-process training as every other plan, and the replicas must be
bit-identical to each other; the data-parallel cases share one pair of ranks.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import pytest

import torchrec_adaptive as ta

from .harness import run_ranks, train_and_compare

pytestmark = pytest.mark.distributed

STEPS, TOL = 20, 1e-5
ADAMAR = {"lr": 0.05, "alpha": 1e-2, "eps": 0.1}


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise", "column_wise", "table_row_wise", "mixed"])
def test_adamar_matches_single_process(sharding_type: str) -> None:
    results = run_ranks(train_and_compare, sharding_type, ta.AdamAR, ADAMAR, STEPS, TOL)
    assert sum(r["checked"] for r in results) > 0


# Row-wise Adagrad keeps one accumulator per row, a mean over the row's columns; under
# column-wise sharding each shard averages its own columns (as FBGEMM does), so
# column_wise is left out here on purpose (see the module docs of distributed/).
@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise", "table_row_wise"])
def test_rowwise_adagrad_matches_single_process(sharding_type: str) -> None:
    results = run_ranks(train_and_compare, sharding_type, ta.RowWiseAdagrad, {"lr": 0.1, "eps": 0.5}, STEPS, TOL)
    assert sum(r["checked"] for r in results) > 0


def test_adam_row_wise_matches_single_process() -> None:
    results = run_ranks(train_and_compare, "row_wise", ta.Adam, {"lr": 0.05, "eps": 0.1}, STEPS, TOL)
    assert sum(r["checked"] for r in results) > 0


RWA = {"lr": 0.1, "eps": 0.5}
FAL = {**ADAMAR, "fal_tau": 3.0}
# (plan, rule, kwargs): "data_parallel" replicates every table (one kernel, two dim groups),
# "dp_mixed" replicates t1 next to a row-wise t0 and a table-wise t2 (harness.per_param_sharding).
DP_CASES: List[Tuple[str, str, Dict[str, Any]]] = [
    ("data_parallel", "AdamAR", ADAMAR), ("dp_mixed", "AdamAR", ADAMAR),
    ("data_parallel", "RowWiseAdagrad", RWA), ("dp_mixed", "RowWiseAdagrad", RWA),
    ("dp_mixed", "AdamAR", FAL),
]


def data_parallel_worker(rank: int) -> Dict[str, Any]:
    return {f"{plan} {rule}{' FAL' if 'fal_tau' in kw else ''}":
            train_and_compare(rank, plan, getattr(ta, rule), kw, STEPS, TOL) for plan, rule, kw in DP_CASES}


def test_data_parallel_matches_single_process() -> None:
    results = run_ranks(data_parallel_worker)
    for case in results[0]:
        assert all(r[case]["checked"] > 0 and r[case]["replicas_identical"] > 0 for r in results), (case, results)


# FBGEMM's ROWWISE_RMSPROP_AR twin (tests/kernels/test_rmsprop_ar_fbgemm.py checks it against the op)
@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise"])
def test_rowwise_rmsprop_ar_matches_single_process(sharding_type: str) -> None:
    kw = {"lr": 0.05, "ar_alpha": 0.5, "eps": 0.1}
    results = run_ranks(train_and_compare, sharding_type, ta.RowWiseRMSpropAR, kw, STEPS, TOL)
    assert sum(r["checked"] for r in results) > 0
