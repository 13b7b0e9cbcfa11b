"""The integration pitfalls, each on 2 gloo ranks (see harness.pitfall_worker):

* stock TorchRec sharders fail with "Cannot cast ... to an EmbOptimType" on our optimizer;
* ``apply_optimizer_in_backward(AdamAR, ebc.parameters(), {...})`` + ``DMP(model,
  sharders=sharders())`` with no plan just works, all tables on our kernel;
* in a model mixing our optimizer and TorchRec's RowWiseAdagrad, our kwargs never
  reach FBGEMM's kernel and FBGEMM's tables stay on FBGEMM;
* the planner helper names ``customized_kernel`` for our tables only.
"""

from __future__ import annotations

import pytest

from .harness import pitfall_worker, run_ranks

pytestmark = pytest.mark.distributed


def test_pitfalls() -> None:
    results = run_ranks(pitfall_worker)
    for r in results:
        assert set(r["plain_plan"].values()) == {"customized_kernel"}
        assert r["helper_plan"] == {"t0": "customized_kernel", "t1": "customized_kernel", "t2": "stock"}
