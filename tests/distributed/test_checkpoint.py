"""DCP round trip of sharded weights and optimizer state (incl. the step k).

TorchRec skips ShardedTensor bookkeeping for customized kernels; without our
override row-wise weights would reach state_dict as plain local tensors and DCP
would keep only one rank's rows. Each rank checks its own shards after loading, and
that training resumes identically.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .harness import dcp_worker, run_ranks

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("sharding_type", ["row_wise", "column_wise"])
def test_dcp_round_trip(sharding_type: str, tmp_path: Path) -> None:
    results = run_ranks(dcp_worker, sharding_type, str(tmp_path / "ckpt"))
    assert all(r["shards_compared"] > 0 for r in results)
