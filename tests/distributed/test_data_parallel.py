"""Data-parallel tables on our kernel, what is not parity (that is in test_sharded_parity.py).

On 2 gloo ranks:

* DDP never holds our data-parallel weights: a lookup with only our tables is not
  wrapped in DDP at all; one that also holds a stock dense data-parallel table is, and
  its DDP holds that table but not ours; DMP's own DDP (for a dense head) holds the
  head but none of our tables. Training goes on (DDP would stall or raise on a weight
  that never gets a gradient), and every replicated tensor stays identical on both ranks.
* A non-finite gradient on one replica is refused on every replica (the same
  ``FloatingPointError``, nothing updated), not applied on some and not a hang.
* The planner helper plans a table data_parallel on ``customized_kernel`` when the
  constraints ask for it, and that plan trains.
"""

from __future__ import annotations

from typing import Any, Dict, List, Set

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import data_parallel, row_wise
from torchrec.distributed.types import ShardingEnv
from torchrec.optim.optimizers import in_backward_optimizer_filter

import torchrec_adaptive as ta

from .harness import (
    BATCH_PER_RANK, TABLES, WORLD_SIZE, Wrapper, assert_replicas_identical, global_batches, kjt_for, make_ebc,
    per_param_sharding, run_ranks, shard_with_plan,
)

pytestmark = pytest.mark.distributed

ADAMAR = {"lr": 0.05, "alpha": 1e-2, "eps": 0.1}


class _WithHead(Wrapper):
    """The harness model plus a dense head, so that DMP wraps the model in its own DDP."""

    def __init__(self, ebc: nn.Module) -> None:
        super().__init__(ebc)  # type: ignore[arg-type]
        torch.manual_seed(3)
        self.head = nn.Linear(sum(d * len(fs) for _, _, d, fs in TABLES), 1)

    def forward(self, kjt: Any) -> torch.Tensor:  # type: ignore[override]
        return self.head(super().forward(kjt)).squeeze(1)


def _storages(tensors: Any) -> Set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def _our_kernels(model: nn.Module) -> List[ta.AdaptiveTBE]:
    from torchrec_adaptive.epochs import all_modules

    return [m for m in all_modules(model) if isinstance(m, ta.AdaptiveTBE)]


def _build(plan: Dict[str, Any], ours: List[str]) -> DistributedModelParallel:
    ebc = make_ebc()
    apply_optimizer_in_backward(ta.AdamAR, [ebc.embedding_bags[n].weight for n in ours], dict(ADAMAR))
    return shard_with_plan(_WithHead(ebc), ebc, plan)


def _train(model: DistributedModelParallel, rank: int, steps: int) -> None:
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    opt = torch.optim.SGD(list(dense.values()), lr=0.1)
    for lengths, ids in global_batches(steps, WORLD_SIZE * BATCH_PER_RANK):
        opt.zero_grad()
        out = model(kjt_for(lengths, ids, rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK))
        torch.tanh(out).sub(0.3).pow(2).mean().backward()
        opt.step()


def _assert_same_on_every_rank(name: str, t: torch.Tensor) -> None:
    first = t.detach().clone()
    dist.broadcast(first, src=0)
    assert torch.equal(first, t.detach()), f"{name} differs between ranks"


def ddp_worker(rank: int) -> Dict[str, Any]:
    from torchrec_adaptive.distributed import ReplicatedLookup, plan

    # 1. t0 ours data-parallel, t1 ours row-wise, t2 a stock dense data-parallel table (no
    #    in-backward optimizer: DDP all-reduces its gradient, SGD below applies it).
    model = _build({"t0": data_parallel(), "t1": row_wise(), "t2": data_parallel()}, ours=["t0", "t1"])
    ours = _storages(t for k in _our_kernels(model) for t in (*k.parameters(), *k.buffers()))
    ebc = model.module.ebc
    ddps = [lk for lk in ebc._lookups if isinstance(lk, DistributedDataParallel)]
    assert len(ddps) == 1, [type(lk).__name__ for lk in ebc._lookups]
    held = _storages(ddps[0]._module_parameters)
    assert held and not held & ours, "the data-parallel lookup's DDP holds our weights"
    t2 = ebc.embedding_bags["t2"].weight
    assert t2.untyped_storage().data_ptr() in held, "the stock dense table is not under DDP"
    outer = model._dmp_wrapped_module
    assert isinstance(outer, DistributedDataParallel), type(outer).__name__
    outer_held = _storages(outer._module_parameters)
    assert not outer_held & ours, "DMP's DDP holds our weights"
    assert _storages(model.module.head.parameters()) <= outer_held
    assert "ebc.embedding_bags.t0.weight" in outer.parameters_to_ignore
    before = t2.detach().clone()
    _train(model, rank, 3)
    assert not torch.equal(before, t2.detach()), "the stock data-parallel table did not train"
    _assert_same_on_every_rank("t2 (stock, DDP)", t2)
    _assert_same_on_every_rank("head", model.module.head.weight)
    identical = assert_replicas_identical(model, ["t0"])

    # 2. Only our tables data-parallel: their lookup is not given to DDP at all.
    model = _build(per_param_sharding("data_parallel"), ours=[n for n, *_ in TABLES])
    lookups = model.module.ebc._lookups
    assert [type(lk) for lk in lookups] == [ReplicatedLookup], [type(lk).__name__ for lk in lookups]
    outer = model._dmp_wrapped_module
    assert isinstance(outer, DistributedDataParallel)
    ours = _storages(t for k in _our_kernels(model) for t in k.parameters())
    assert not _storages(outer._module_parameters) & ours
    _train(model, rank, 3)
    identical += assert_replicas_identical(model, [n for n, *_ in TABLES])
    before = {k: v.clone() for k, v in model.state_dict().items() if "embedding_bags" in k}
    lengths, ids = global_batches(1, WORLD_SIZE * BATCH_PER_RANK, seed=5)[0]
    out = model(kjt_for(lengths, ids, rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK))
    try:
        (out.sum() * (float("nan") if rank == 1 else 1.0)).backward()
        raise AssertionError("a NaN gradient on rank 1 was applied")
    except FloatingPointError as e:
        assert ("feature 0 (table 't0')" in str(e)) if rank == 1 else ("data-parallel replica(s) [1]" in str(e)), str(e)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items()), "a refused step changed a replica"
    identical += assert_replicas_identical(model, [n for n, *_ in TABLES])

    # 3. The planner helper, asked for data_parallel, plans our kernel there.
    ebc = make_ebc()
    apply_optimizer_in_backward(ta.AdamAR, ebc.embedding_bags.parameters(), dict(ADAMAR))
    wrapped = _WithHead(ebc)
    constraints = {"t1": ParameterConstraints(sharding_types=["data_parallel"], compute_kernels=["customized_kernel"])}
    sharding_plan = plan(wrapped, dist.group.WORLD, batch_size=BATCH_PER_RANK, constraints=constraints)
    t1 = sharding_plan.plan["ebc"]["t1"]  # type: ignore[index]
    assert (t1.sharding_type, t1.compute_kernel) == ("data_parallel", "customized_kernel"), t1
    from torchrec_adaptive.distributed import sharders

    model = DistributedModelParallel(wrapped, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                     device=torch.device("cpu"), plan=sharding_plan, sharders=sharders())
    _train(model, rank, 2)
    identical += assert_replicas_identical(model, ["t1"])
    return {"identical": identical}


def test_ddp_holds_no_replicated_weights_and_planner_plans_data_parallel() -> None:
    results = run_ranks(ddp_worker)
    assert all(r["identical"] >= 3 * 6 for r in results), results
