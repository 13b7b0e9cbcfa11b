"""Helen on 2 gloo ranks equals Helen in one process on the global batch.

Also with a data-parallel table (dp_mixed: t1 replicated next to row-wise t0 and
table-wise t2): both of Helen's passes gather the global batch's gradient.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from .harness import (
    BATCH_PER_RANK, TABLES, WORLD_SIZE, Wrapper, compare_sharded, global_batches, head_weight, kjt_for, loss_of,
    make_ebc, per_param_sharding, replicated_tables, run_ranks,
)

pytestmark = pytest.mark.distributed
STEPS, RHO, XI = 10, 0.05, 0.2


class _Ref(nn.Module):
    def __init__(self, kernel: nn.Module) -> None:
        super().__init__()
        self.kernel = kernel


def helen_worker(rank: int, sharding_type: str) -> Dict[str, Any]:
    import torchrec_adaptive as tra
    from torchrec_adaptive import AdaptiveTBE, TableSpec
    from torchrec_adaptive.distributed import AdaptiveEmbeddingBagCollectionSharder, sharders
    from torchrec_adaptive.helen import Helen

    kwargs = {"lr": 0.02, "alpha": 0.01}
    ebc = make_ebc()
    init = {k: v.detach().clone() for k, v in ebc.state_dict().items()}
    apply_optimizer_in_backward(tra.AdamAR, ebc.embedding_bags.parameters(), dict(kwargs))
    plan = construct_module_sharding_plan(
        ebc, per_param_sharding=per_param_sharding(sharding_type), local_size=WORLD_SIZE, world_size=WORLD_SIZE,
        device_type="cpu", sharder=AdaptiveEmbeddingBagCollectionSharder(),
    )
    model = DistributedModelParallel(Wrapper(ebc), env=ShardingEnv.from_process_group(dist.group.WORLD),
                                     device=torch.device("cpu"), plan=ShardingPlan({"ebc": plan}), sharders=sharders())
    model.load_state_dict({f"ebc.{k}": v for k, v in init.items()})
    specs = [TableSpec(n, r, d) for n, r, d, _ in TABLES]
    ftm = [i for i, (*_, fs) in enumerate(TABLES) for _ in fs]
    ref = AdaptiveTBE(specs, tra.AdamAR.rule_config(**kwargs), feature_table_map=ftm)
    with torch.no_grad():
        for (n, *_), w in zip(TABLES, ref.split_embedding_weights()):
            w.copy_(init[f"embedding_bags.{n}.weight"])
    helen, helen_ref = Helen(model, None, rho=RHO, xi=XI), Helen(_Ref(ref), None, rho=RHO, xi=XI)
    w_head = head_weight(sum(d * len(fs) for _, _, d, fs in TABLES))
    lo, hi = rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK
    for lengths, ids in global_batches(STEPS, WORLD_SIZE * BATCH_PER_RANK):
        helen.step(lambda: loss_of(model(kjt_for(lengths, ids, lo, hi)), w_head))
        g = kjt_for(lengths, ids, 0, WORLD_SIZE * BATCH_PER_RANK)
        helen_ref.step(lambda: loss_of(ref(g.values(), g.offsets()), w_head))
    moved = max((w - init[f"embedding_bags.{n}.weight"]).abs().max().item()
                for (n, *_), w in zip(TABLES, ref.split_embedding_weights()))
    assert moved > 1e-3, "the reference barely trained"
    sd = model.state_dict()
    replicated = replicated_tables(sharding_type)
    checked = sum(compare_sharded(f"weight {n}", sd[f"ebc.embedding_bags.{n}.weight"], w, 1e-5, n in replicated)
                  for (n, *_), w in zip(TABLES, ref.split_embedding_weights()))
    return {"checked": checked}


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise", "dp_mixed"])
def test_helen_sharded_equals_single_process(sharding_type: str) -> None:
    results = run_ranks(helen_worker, sharding_type)
    assert sum(r["checked"] for r in results) >= len(TABLES)
