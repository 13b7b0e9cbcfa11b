"""Checkpoints move between stock TorchRec and ours, both ways (2 gloo ranks, row-wise plan).

Stock -> ours: stock TorchRec trains its fused ``EXACT_ROWWISE_ADAGRAD`` (FBGEMM's CPU
kernel) 3 steps and saves with plain ``torch.distributed.checkpoint``; a fresh model of
ours (``RowWiseAdagrad``, the same rule) loads it with ``checkpoint.load(...,
from_stock=True)``, must hold exactly the saved weights and sums (``momentum1``), and
then trains 3 more steps next to the stock model continuing from the same point: both
must agree to 1e-5 (independent implementations of one rule). Without ``from_stock`` the
load is refused with a message that says what to do.

Ours -> stock: our model saves with ``checkpoint.save``; a fresh stock model reads it
with plain ``dcp.load`` of its own state dict (DCP ignores our extra keys: ``prev_iter``,
``row_count``, the step entry), loads it into its fused optimizer, and continues next to
ours: again equal to 1e-5.

Stock Adam is not in this test: FBGEMM 1.8.0's ``ADAM`` has no CPU kernel ("Optimizer adam
is not supported in CPU mode"). Its TorchRec keys are ``<table>.momentum1`` (m) and
``<table>.exp_avg_sq`` (v), our Adam's slot names (``rules/slot_names.py``, read from
TorchRec's ``EmbeddingFusedOptimizer`` and FBGEMM's ``get_optimizer_state``).
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor

from .harness import (
    BATCH_PER_RANK,
    TABLES,
    WORLD_SIZE,
    Wrapper,
    global_batches,
    head_weight,
    kjt_for,
    loss_of,
    make_ebc,
    per_param_sharding,
    run_ranks,
    shard_with_plan,
)

pytestmark = pytest.mark.distributed

KWARGS = {"lr": 0.1, "eps": 1e-8}
TOL = 1e-5


def _stock_model() -> Any:
    """TorchRec's own route: its RowWiseAdagrad, its sharders, FBGEMM's fused kernel."""
    from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim import RowWiseAdagrad

    ebc = make_ebc()
    init = {f"ebc.{k}": v.detach().clone() for k, v in ebc.state_dict().items()}
    apply_optimizer_in_backward(RowWiseAdagrad, ebc.embedding_bags.parameters(), dict(KWARGS))
    plan = construct_module_sharding_plan(ebc, per_param_sharding=per_param_sharding("row_wise"), local_size=WORLD_SIZE,
                                          world_size=WORLD_SIZE, device_type="cpu", sharder=EmbeddingBagCollectionSharder())
    model = DistributedModelParallel(Wrapper(ebc), env=ShardingEnv.from_process_group(dist.group.WORLD),
                                     device=torch.device("cpu"), plan=ShardingPlan({"ebc": plan}),
                                     sharders=[EmbeddingBagCollectionSharder()])
    model.load_state_dict(init)
    kernels = {type(emb).__name__ for lookup in model.module.ebc._lookups for emb in lookup._emb_modules}
    assert kernels == {"BatchedFusedEmbeddingBag"}, f"the stock model is not FBGEMM's fused kernel: {kernels}"
    return model


def _our_model() -> Any:
    from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward

    import torchrec_adaptive as ta

    ebc = make_ebc()
    apply_optimizer_in_backward(ta.RowWiseAdagrad, ebc.embedding_bags.parameters(), dict(KWARGS))
    return shard_with_plan(Wrapper(ebc), ebc, per_param_sharding("row_wise"))


def _train(model: Any, rank: int, batches: List[Any]) -> None:
    w = head_weight(sum(d * len(fs) for _, _, d, fs in TABLES))
    lo, hi = rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK
    for lengths, ids in batches:
        loss_of(model(kjt_for(lengths, ids, lo, hi)), w).backward()


def _snapshot(model: Any) -> Dict[str, torch.Tensor]:
    """This rank's shards of every table's weight and momentum1 (the sum G_r), as copies."""
    out: Dict[str, torch.Tensor] = {}
    sd = model.state_dict()
    opt = model.fused_optimizer.state_dict()["state"]
    for name, *_ in TABLES:
        param = f"ebc.embedding_bags.{name}.weight"
        for what, value in (("weight", sd[param]), ("momentum1", opt[param][f"{name}.momentum1"])):
            assert isinstance(value, ShardedTensor), f"{name} {what}: {type(value).__name__}"
            for shard in value.local_shards():
                out[f"{name}.{what}@{shard.metadata.shard_offsets}"] = shard.tensor.detach().clone()
    return out


def _max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], what: str) -> float:
    assert sorted(a) == sorted(b), f"{what}: keys {sorted(a)} vs {sorted(b)}"
    worst = 0.0
    for k in a:
        diff = (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0
        assert diff <= TOL, f"{what}: {k} differs by {diff:.3g} > {TOL}"
        worst = max(worst, diff)
    return worst


def stock_and_ours_worker(rank: int, path: str) -> Dict[str, Any]:
    from torchrec_adaptive.distributed import checkpoint

    batches = global_batches(6, WORLD_SIZE * BATCH_PER_RANK, seed=3)
    first, then = batches[:3], batches[3:]

    # --- stock -> ours
    stock = _stock_model()
    _train(stock, rank, first)
    saved = _snapshot(stock)
    assert any(v.count_nonzero() for k, v in saved.items() if "momentum1" in k), "stock sums are zero: vacuous"
    dcp.save({"model": stock.state_dict(), "optim": stock.fused_optimizer.state_dict()},
             checkpoint_id=f"{path}/stock")
    ours = _our_model()
    try:
        checkpoint.load(ours, f"{path}/stock", verify_files=False)
        raise AssertionError("a stock checkpoint loaded without from_stock=True")
    except checkpoint.CheckpointError as e:
        refused = str(e)
    for must in ("'t0.optimizer_step'", "stock TorchRec", "from_stock=True"):
        assert must in refused, f"{must!r} not in: {refused}"
    checkpoint.load(ours, f"{path}/stock", verify_files=False, from_stock=True)
    loaded = _snapshot(ours)
    assert _max_diff(saved, loaded, "loaded from stock") == 0.0
    _train(stock, rank, then)
    _train(ours, rank, then)
    from_stock = _max_diff(_snapshot(stock), _snapshot(ours), "stock -> ours, continued")
    moved = max((a - b).abs().max().item() for a, b in zip(_snapshot(ours).values(), loaded.values()))
    assert moved > 1e-3, f"training after the load barely moved anything ({moved:.2g}): vacuous"

    # --- ours -> stock
    checkpoint.save(ours, f"{path}/ours")
    stock2 = _stock_model()
    state = {"model": stock2.state_dict(), "optim": stock2.fused_optimizer.state_dict()}
    dcp.load(state, checkpoint_id=f"{path}/ours")  # stock TorchRec's way: our extra keys are not read
    stock2.load_state_dict(state["model"])
    stock2.fused_optimizer.load_state_dict(state["optim"])
    assert _max_diff(_snapshot(ours), _snapshot(stock2), "loaded from ours") == 0.0
    _train(ours, rank, first)
    _train(stock2, rank, first)
    from_ours = _max_diff(_snapshot(ours), _snapshot(stock2), "ours -> stock, continued")
    return {"stock_to_ours": from_stock, "ours_to_stock": from_ours, "moved": moved}


def test_checkpoints_move_between_stock_rowwise_adagrad_and_ours(tmp_path):
    results = run_ranks(stock_and_ours_worker, str(tmp_path), timeout=300.0)
    print(results)
    assert all(r["moved"] > 1e-3 for r in results), results
