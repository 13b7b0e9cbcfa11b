"""Frequency admission sharded (2 gloo ranks) equals the same rule in one process.

One pair of ranks trains AdamAR with ``admit_min_count`` under a row-wise, a table-wise and a
data-parallel plan (the counts that decide admission are per global row: a row-wise shard
must count its rows' occurrences from the whole global batch, a replica from the gathered
one); weights and every optimizer state to 1e-5 against the unsharded kernel
(tests/rules/test_admission.py checks that kernel against a dense reference).
"""

from __future__ import annotations

from typing import Any, Dict

import pytest

import torchrec_adaptive as ta

from .harness import run_ranks, train_and_compare

pytestmark = pytest.mark.distributed

STEPS, TOL = 20, 1e-5
KWARGS = {"lr": 0.05, "alpha": 1e-2, "eps": 0.1, "admit_min_count": 3.0}
PLANS = ("row_wise", "table_wise", "data_parallel")


def admission_worker(rank: int) -> Dict[str, Any]:
    return {plan: train_and_compare(rank, plan, ta.AdamAR, KWARGS, STEPS, TOL) for plan in PLANS}


def test_admission_sharded_matches_single_process() -> None:
    results = run_ranks(admission_worker)
    for plan in PLANS:
        assert all(r[plan]["checked"] > 0 for r in results), (plan, results)
