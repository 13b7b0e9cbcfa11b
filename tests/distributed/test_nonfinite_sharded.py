"""After a refused NaN step, a DistributedModelParallel model trains on (issue 12, item 3).

DMP wraps the dense part in DDP. Before the fix our kernel raised inside backward,
which left DDP's reducer mid-backward: every later step failed with
``unmarked_param_indices`` INTERNAL ASSERT. Here step 2's loss is NaN (on rank 0
only at world size 2: TorchRec's all-to-all carries rank 0's gradient to every
table's owner); every rank must raise ``FloatingPointError`` after backward, leave
every table shard and its state unchanged with k advanced, and train steps 3-4.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, data_parallel, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from .harness import (
    BATCH_PER_RANK,
    TABLES,
    Wrapper,
    feature_rows,
    global_batches,
    kjt_for,
    make_ebc,
    run_ranks,
)

pytestmark = pytest.mark.distributed


class DenseOnTop(nn.Module):
    """Embeddings -> Linear, gated by a dense layer computed *before* the lookup: autograd
    runs that layer's backward after our kernel's, so DDP queues its finalize callback
    after the kernel's refusal (the order our error callback must survive)."""

    def __init__(self) -> None:
        super().__init__()
        self.sparse = Wrapper(make_ebc())
        self.pre = nn.Linear(4, 1)
        self.dense = nn.Linear(sum(d * len(fs) for _, _, d, fs in TABLES), 1)

    def forward(self, kjt: Any) -> torch.Tensor:
        gate = torch.sigmoid(self.pre(torch.ones(1, 4)))
        return (self.dense(self.sparse(kjt)) * gate).squeeze(1)


def _plan(sharding_type: str, world: int) -> Dict[str, Any]:
    if sharding_type == "table_wise":
        return {n: table_wise(rank=i % world) for i, (n, *_) in enumerate(TABLES)}
    if sharding_type == "row_wise":
        return {n: row_wise() for n, *_ in TABLES}
    return {n: data_parallel() for n, *_ in TABLES}


def _kernel_state(model: nn.Module) -> List[Dict[str, Any]]:
    from torchrec_adaptive.epochs import all_modules
    from torchrec_adaptive.kernels import AdaptiveTBE

    return [{"weights": m.weights.detach().clone(), "step": m.optimizer_step,
             **{n: b.clone() for n, b in m.named_buffers()}}
            for m in all_modules(model) if isinstance(m, AdaptiveTBE)]


def _sharded(sharding_type: str, world: int) -> DistributedModelParallel:
    """DenseOnTop with AdamAR tables under DMP (which wraps the dense part in DDP)."""
    import torchrec_adaptive as tra
    from torchrec_adaptive.distributed import AdaptiveEmbeddingBagCollectionSharder, sharders

    model = DenseOnTop()
    ebc = model.sparse.ebc
    apply_optimizer_in_backward(tra.AdamAR, ebc.embedding_bags.parameters(), {"lr": 0.05, "alpha": 1e-2})
    module_plan = construct_module_sharding_plan(
        ebc, per_param_sharding=_plan(sharding_type, world), local_size=world, world_size=world,
        device_type="cpu", sharder=AdaptiveEmbeddingBagCollectionSharder())
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                    device=torch.device("cpu"), plan=ShardingPlan({"sparse.ebc": module_plan}),
                                    sharders=sharders())


def nan_step_worker(rank: int, sharding_type: str) -> Dict[str, Any]:
    world = dist.get_world_size()
    dmp = _sharded(sharding_type, world)
    dense_params = [p for n, p in dmp.named_parameters() if "dense" in n or "pre" in n]
    assert dense_params, "the dense part is missing"
    opt = torch.optim.SGD(dense_params, lr=0.1)
    data = global_batches(4, world * BATCH_PER_RANK)
    lo, hi = rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK
    raised: List[int] = []
    for step, (lengths, ids) in enumerate(data, start=1):
        loss = dmp(kjt_for(lengths, ids, lo, hi)).pow(2).mean()
        if step == 2 and rank == 0:
            loss = loss * float("nan")
        if step == 2:
            before = _kernel_state(dmp)
            assert before, "no torchrec_adaptive kernel on this rank"
        opt.zero_grad()
        try:
            loss.backward()
        except FloatingPointError as e:
            assert step == 2, f"step {step} raised {e}"
            assert "non-finite gradient" in str(e) and "table" in str(e) and "'t" in str(e), str(e)
            raised.append(step)
            continue  # skip the bad batch: no dense step either
        opt.step()
        if step == 2:
            raise AssertionError(f"rank {rank}: the NaN step was not refused")
        if step == 3:
            refused = _kernel_state(dmp)
    after = _kernel_state(dmp)
    for b, r, a in zip(before, refused, after):
        assert r["step"] == b["step"] + 2, (b["step"], r["step"])  # the refused step counted, then step 3
        assert a["step"] == b["step"] + 3
        assert not torch.equal(a["weights"], b["weights"]), "training did not go on"
    assert torch.isfinite(torch.cat([p.detach().reshape(-1) for p in dense_params])).all()
    return {"raised": raised, "kernels": len(before), "world": world, "features": len(feature_rows())}


def refused_state_worker(rank: int, sharding_type: str) -> Dict[str, Any]:
    """Weights and row state are bit-identical before and after the refused step itself."""
    world = dist.get_world_size()
    dmp = _sharded(sharding_type, world)
    (lengths, ids), = global_batches(1, world * BATCH_PER_RANK)
    before = _kernel_state(dmp)
    loss = dmp(kjt_for(lengths, ids, rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)).sum() * float("inf")
    with pytest.raises(FloatingPointError):
        loss.backward()
    for b, a in zip(before, _kernel_state(dmp)):
        assert a["step"] == b["step"] + 1
        for key in b:
            if key != "step":
                assert torch.equal(a[key], b[key]), key
    return {"kernels": len(before)}


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise", "data_parallel"])
def test_training_goes_on_after_a_refused_nan_step(sharding_type: str, world: int) -> None:
    results = run_ranks(nan_step_worker, sharding_type, world=world)
    assert [r["raised"] for r in results] == [[2]] * world


def test_a_refused_step_changes_no_shard() -> None:
    results = run_ranks(refused_state_worker, "row_wise")
    assert all(r["kernels"] >= 1 for r in results)
