"""``DistributedModelParallel.reshard`` (TorchRec's dynamic sharding) on our tables: refused at
once with a message naming them, and nothing changes (2 gloo ranks).

TorchRec 1.8.0's ``ShardedEmbeddingBagCollection.update_shards`` rebuilds every table of the
module from the new plan on FBGEMM's kernel and moves FBGEMM's optimizer state only; before
this refusal it failed deep inside with "SplitTableBatchedEmbeddingBagsCodegen.__init__() got
an unexpected keyword argument 'torchrec_adaptive_rule'", after having replaced the module's
shardings. Checked with TorchRec's shipped harness (``dynamic_sharding_test``) and directly.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist

import torchrec_adaptive as ta

from .harness import _mixed_model, _train_steps, free_port, make_ebc, run_ranks, shard_with_plan
from .test_torchrec_harness import _import_harness, _tables

pytestmark = pytest.mark.distributed

REFUSAL = "DistributedModelParallel.reshard is not supported"


def harness_worker(rank: int, port: int) -> Dict[str, Any]:
    import os
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed.planner.types import ParameterConstraints
    from torchrec.distributed.test_utils.test_model import TestSparseNN

    from torchrec_adaptive.distributed import AdaptiveEmbeddingBagCollectionSharder

    class TableWise(AdaptiveEmbeddingBagCollectionSharder):
        """Our sharder as the harness wants one: one sharding type, and the kernel it names
        in the new plan (TorchRec's TestEBCSharder keeps it in ``_kernel_type``)."""

        _kernel_type = "fused"

        def sharding_types(self, compute_device_type: str) -> List[str]:
            return ["table_wise"]

    tables, _, groups = _tables("sum")
    # The harness builds its own process group (MultiProcessContext): on a fresh rendezvous.
    dist.destroy_process_group()
    os.environ["MASTER_PORT"] = str(port)
    try:
        _import_harness().dynamic_sharding_test(
            rank=rank, world_size=2, model_class=TestSparseNN, embedding_groups=groups, tables=tables,
            sharders=[TableWise()], backend="gloo", optim=EmbOptimType.EXACT_SGD,
            constraints={t.name: ParameterConstraints(sharding_types=["table_wise"]) for t in tables},
            apply_optimizer_in_backward_config={"embedding_bags": (ta.AdamAR, {"lr": 0.05, "alpha": 1e-2})},
            local_size=2, random_seed=3,
        )
    except NotImplementedError as e:
        return {"error": str(e)}
    return {"error": None}


def test_reshard_refused_in_torchrecs_dynamic_sharding_harness() -> None:
    results = run_ranks(harness_worker, free_port(), timeout=300.0)
    for r in results:
        assert r["error"] is not None and REFUSAL in r["error"], r
        assert all(t in r["error"] for t in ("table_0", "table_1", "table_2", "table_3")), r
        assert "Nothing was changed" in r["error"] and "checkpoint.load" in r["error"], r


def _local(value: torch.Tensor) -> List[torch.Tensor]:
    """This rank's tensors of a ShardedTensor (comparing ShardedTensors is a collective), or the tensor."""
    shards = getattr(value, "local_shards", None)
    return [s.tensor for s in shards()] if shards is not None else [value]


def direct_worker(rank: int) -> Dict[str, Any]:
    from torchrec.distributed.sharding.dynamic_sharding import output_sharding_plan_delta_single
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise

    from torchrec_adaptive.distributed import AdaptiveEmbeddingBagCollectionSharder

    model = _mixed_model()  # t0, t1: AdamAR (ours); t2: FBGEMM row-wise Adagrad
    per_param = {"t0": table_wise(rank=0), "t1": table_wise(rank=1), "t2": table_wise(rank=0)}
    dmp = shard_with_plan(model, model.ebc, per_param)
    _train_steps(dmp, rank, 2)
    before = {k: [t.clone() for t in _local(v)] for k, v in dmp.state_dict().items()}
    opt_before = {k: {s: [t.clone() for t in _local(v)] for s, v in st.items() if isinstance(v, torch.Tensor)}
                  for k, st in dmp.fused_optimizer.state_dict()["state"].items()}
    plan_before = dict(dmp.plan.plan["ebc"])

    moved = {**per_param, "t0": table_wise(rank=1), "t2": table_wise(rank=1)}
    new_plan = construct_module_sharding_plan(make_ebc(), per_param_sharding=moved, local_size=2, world_size=2,
                                              device_type="cpu", sharder=AdaptiveEmbeddingBagCollectionSharder())
    delta = output_sharding_plan_delta_single(dmp.plan.plan["ebc"], new_plan)  # type: ignore[arg-type]
    with pytest.raises(NotImplementedError) as err:
        dmp.reshard(sharded_module_fqn="ebc", changed_shard_to_params={"ebc": delta})

    after = {k: _local(v) for k, v in dmp.state_dict().items()}
    assert after.keys() == before.keys()
    for k, ts in before.items():
        assert len(ts) == len(after[k]) and all(torch.equal(a, b) for a, b in zip(ts, after[k])), k
    opt_after = dmp.fused_optimizer.state_dict()["state"]
    for k, slots in opt_before.items():
        for s, ts in slots.items():
            assert len(ts) == len(_local(opt_after[k][s])), (k, s)
            assert all(torch.equal(a, b) for a, b in zip(ts, _local(opt_after[k][s]))), (k, s)
    assert dict(dmp.plan.plan["ebc"]) == plan_before
    loss = _train_steps(dmp, rank, 1)  # still trains
    dist.barrier()
    return {"error": str(err.value), "loss": loss}


def test_reshard_refusal_changes_nothing() -> None:
    results = run_ranks(direct_worker, timeout=240.0)
    for r in results:
        assert REFUSAL in r["error"] and "['t0', 't1']" in r["error"], r
        assert "of which ours: ['t0']" in r["error"], r  # t2 (FBGEMM) moves too, and is named with the request
        assert torch.isfinite(torch.tensor(r["loss"]))
