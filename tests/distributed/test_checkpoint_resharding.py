"""DCP checkpoints across plans and world sizes, and checkpoints that must not load.

One 2-rank run trains AdamAR row-wise for 3 steps and saves; the checkpoint is then
loaded (a) table-wise on the same 2 ranks and (b) on 1 rank, and training goes on for
2 steps. Both must equal an uninterrupted run to 1e-5: the single-process kernel
trained 5 steps on the global batches (weights, momentum1, exp_avg_sq, prev_iter,
row_count, step k), and the 2-rank row-wise run itself, continued and saved at step 5.

Negative controls: the row-wise state dict holds ShardedTensors with the global shape
(a lost shard would show as a local shape, and ``checkpoint.check`` refuses such a
checkpoint); a model whose local shards are overwritten after the save gets them back
on load; a RowWiseAdagrad or Adam checkpoint, or one missing a state key, is refused
with a ``ValueError`` naming table and key, and leaves the model untouched.

Data-parallel: a second 2-rank run trains AdamAR data-parallel and row-wise side by side
and saves both at steps 3 and 5. The data-parallel checkpoint holds plain tensors of the
global shape (weights and every state), loads exactly into a fresh data-parallel model,
and reshards both ways: data-parallel -> row-wise and row-wise -> data-parallel, each
continued for 2 steps, equal the uninterrupted runs to 1e-5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, data_parallel, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan

import torchrec_adaptive as ta

from .harness import (
    TABLES, Wrapper, _check_close, _local_shards, assert_replicas_identical, check_against_reference, global_batches,
    head_weight, kjt_for, loss_of, make_ebc, run_ranks,
)

pytestmark = pytest.mark.distributed

KWARGS = {"lr": 0.05, "alpha": 1e-2, "eps": 0.1}
GLOBAL_BATCH, BEFORE, AFTER, TOL = 16, 3, 2, 1e-5


def _plan(kind: str, world: int) -> Dict[str, Any]:
    if kind == "row_wise":
        return {n: row_wise() for n, *_ in TABLES}
    if kind == "table_wise":  # on 2 ranks t0 moves to rank 1, t1/t2 to rank 0: no shard stays where it was
        return {n: table_wise(rank=(i + 1) % world) for i, (n, *_) in enumerate(TABLES)}
    if kind == "data_parallel":
        return {n: data_parallel() for n, *_ in TABLES}
    raise ValueError(kind)


def _replicated(kind: str) -> List[str]:
    return [n for n, *_ in TABLES] if kind == "data_parallel" else []


def _build(kind: str, opt_cls: type = ta.AdamAR, kwargs: Dict[str, Any] = KWARGS) -> DistributedModelParallel:
    from torchrec_adaptive.distributed import AdaptiveEmbeddingBagCollectionSharder, sharders

    world = dist.get_world_size()
    ebc = make_ebc()
    apply_optimizer_in_backward(opt_cls, ebc.embedding_bags.parameters(), dict(kwargs))
    plan = construct_module_sharding_plan(ebc, per_param_sharding=_plan(kind, world), local_size=world,
                                          world_size=world, device_type="cpu",
                                          sharder=AdaptiveEmbeddingBagCollectionSharder())
    return DistributedModelParallel(Wrapper(ebc), env=ShardingEnv.from_process_group(dist.group.WORLD),
                                    device=torch.device("cpu"), plan=ShardingPlan({"ebc": plan}), sharders=sharders())


def _train(model: nn.Module, batches: List[Any]) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    per = GLOBAL_BATCH // world
    w_head = head_weight(sum(d * len(fs) for _, _, d, fs in TABLES))
    for lengths, ids in batches:
        loss_of(model(kjt_for(lengths, ids, rank * per, (rank + 1) * per)), w_head).backward()


def _reference(steps: int) -> ta.AdaptiveTBE:
    """The uninterrupted run: one kernel, all tables, global batches, from make_ebc()'s init."""
    init = make_ebc().state_dict()
    specs = [ta.TableSpec(n, r, d) for n, r, d, _ in TABLES]
    ftm = [i for i, (*_, fs) in enumerate(TABLES) for _ in fs]
    ref = ta.AdaptiveTBE(specs, ta.AdamAR.rule_config(**KWARGS), feature_table_map=ftm)
    with torch.no_grad():
        for (n, *_), w in zip(TABLES, ref.split_embedding_weights()):
            w.copy_(init[f"embedding_bags.{n}.weight"])
    w_head = head_weight(sum(d * len(fs) for _, _, d, fs in TABLES))
    for lengths, ids in global_batches(BEFORE + AFTER, GLOBAL_BATCH)[:steps]:
        g = kjt_for(lengths, ids, 0, GLOBAL_BATCH)
        loss_of(ref(g.values(), g.offsets()), w_head).backward()
    return ref


def _assert_equal_shards(a: Dict[str, List[torch.Tensor]], b: Dict[str, List[torch.Tensor]], what: str,
                         tol: float) -> int:
    if set(a) != set(b):
        raise AssertionError(f"{what}: keys differ: {sorted(set(a) ^ set(b))}")
    n = 0
    for k in a:
        if len(a[k]) != len(b[k]):
            raise AssertionError(f"{what}: {k} has {len(a[k])} vs {len(b[k])} local shards")
        for x, y in zip(a[k], b[k]):
            _check_close(f"{what}: {k}", y, x, tol)
            n += 1
    return n


def _resume_and_compare(path: str, kind: str) -> int:
    """Load the step-3 checkpoint under ``kind``, train 2 steps, compare with both uninterrupted runs."""
    from torchrec_adaptive.distributed import checkpoint

    data = global_batches(BEFORE + AFTER, GLOBAL_BATCH)
    resumed = _build(kind)
    checkpoint.load(resumed, f"{path}/step3")
    for table_state in resumed.fused_optimizer.state_dict()["state"].values():
        steps = [int(v["step"]) for k, v in table_state.items() if k.endswith(".optimizer_step")]
        assert steps == [BEFORE], f"step k after load: {steps}"
    _train(resumed, data[BEFORE:])
    replicated = _replicated(kind)
    checked = check_against_reference(resumed, _reference(BEFORE + AFTER), BEFORE + AFTER, TOL, replicated=replicated)
    final = _build(kind)
    checkpoint.load(final, f"{path}/step5")  # the 2-rank run that saved step3, not interrupted
    checked += _assert_equal_shards(_local_shards(final, replicated), _local_shards(resumed, replicated),
                                    f"{kind} vs uninterrupted", TOL)
    return checked


def save_and_reshard_worker(rank: int, path: str) -> Dict[str, Any]:
    from torchrec_adaptive.distributed import checkpoint

    data = global_batches(BEFORE + AFTER, GLOBAL_BATCH)
    a = _build("row_wise")
    a.load_state_dict({f"ebc.{k}": v for k, v in make_ebc().state_dict().items()})
    _train(a, data[:BEFORE])

    # Negative control 1: row-wise weights and states are ShardedTensors of the global shape,
    # of which this rank holds a strict part (a lost shard would be a plain local tensor).
    sd, ost = a.state_dict(), a.fused_optimizer.state_dict()["state"]
    for n, rows, dim, _ in TABLES:
        w = sd[f"ebc.embedding_bags.{n}.weight"]
        assert isinstance(w, ShardedTensor) and tuple(w.size()) == (rows, dim), (n, type(w), getattr(w, "shape", None))
        local = sum(s.tensor.shape[0] for s in w.local_shards())
        total = torch.tensor([local])
        dist.all_reduce(total)
        assert 0 < local < rows and int(total) == rows, (n, local, int(total))
        for slot, shape in (("momentum1", (rows, dim)), ("prev_iter", (rows,)), ("row_count", (rows,))):
            v = ost[f"ebc.embedding_bags.{n}.weight"][f"{n}.{slot}"]
            assert isinstance(v, ShardedTensor) and tuple(v.size()) == shape, (n, slot, tuple(v.size()))

    checkpoint.save(a, f"{path}/step3")
    saved = _local_shards(a)
    # Negative control 2: a checkpoint that lost the other rank's rows (local tensors saved
    # under the global keys, what TorchRec does for customized kernels without our override).
    lost = {"model": {k: v.local_shards()[0].tensor for k, v in sd.items()}, "optim": a.fused_optimizer.state_dict()}
    dcp.save(lost, checkpoint_id=f"{path}/lost")
    try:
        checkpoint.check(a, f"{path}/lost")
        raise AssertionError("a checkpoint holding one rank's rows passed the check")
    except ValueError as e:
        assert "ebc.embedding_bags.t0.weight: global shape" in str(e), str(e)
    # Negative control 3: overwrite this rank's shards after the save; loading restores them.
    with torch.no_grad():
        for k, v in list(a.state_dict().items()) + [
            (f"{p}/{s}", x) for p, st in a.fused_optimizer.state_dict()["state"].items() for s, x in st.items()
            if isinstance(x, ShardedTensor)
        ]:
            for shard in v.local_shards():
                shard.tensor.add_(1)
    a.fused_optimizer.set_optimizer_step(99)
    changed = _local_shards(a)
    assert all(not torch.equal(x, y) for k in saved for x, y in zip(saved[k], changed[k]) if x.numel()), \
        "the overwrite did not change every shard; the restore check would be vacuous"
    checkpoint.load(a, f"{path}/step3")
    restored = _assert_equal_shards(saved, _local_shards(a), "restored after overwrite", 0.0)

    _train(a, data[BEFORE:])  # the uninterrupted 2-rank run
    checkpoint.save(a, f"{path}/step5")

    # Checkpoints that must not load: another optimizer (other slots / same slots), a missing key.
    other = _build("row_wise", ta.RowWiseAdagrad, {"lr": 0.1})
    _train(other, data[:1])
    checkpoint.save(other, f"{path}/rowwise_adagrad")
    adam = _build("row_wise", ta.Adam, {"lr": 0.05})
    _train(adam, data[:1])
    checkpoint.save(adam, f"{path}/adam")
    missing = checkpoint.state_dict(a)
    del missing["optim"]["state"]["ebc.embedding_bags.t1.weight"]["t1.row_count"]
    dcp.save(missing, checkpoint_id=f"{path}/missing")

    target = _build("row_wise")
    before = _local_shards(target)
    errors = {}
    for name, must_say in (("rowwise_adagrad", ["table 't0'", "'t0.exp_avg_sq'", "'RowWiseAdagrad'", "t0.momentum1"]),
                           ("adam", ["table 't1'", "written by optimizer 'Adam'", "with 'AdamAR'"]),
                           ("missing", ["table 't1'", "'t1.row_count'"])):
        try:
            checkpoint.load(target, f"{path}/{name}")
            raise AssertionError(f"checkpoint {name} loaded into an AdamAR model")
        except ValueError as e:
            errors[name] = str(e)
            for s in must_say:
                assert s in str(e), f"{name}: {s!r} not in: {e}"
    # Plain dcp.load names the key as well (DCP's own check, before any read): since both rules call their
    # first slot momentum1 (FBGEMM's name), DCP meets its shape mismatch before the missing exp_avg_sq.
    try:
        dcp.load(checkpoint.state_dict(target), checkpoint_id=f"{path}/rowwise_adagrad")
        raise AssertionError("dcp.load accepted a RowWiseAdagrad checkpoint for an AdamAR model")
    except dcp.CheckpointException as e:  # a BaseException, wrapping every rank's error
        assert "t0.momentum1" in str(e), str(e)
    # In-memory load of another optimizer's state (same slot names): refused per table, before any copy.
    try:
        target.fused_optimizer.load_state_dict(adam.fused_optimizer.state_dict())
        raise AssertionError("fused_optimizer.load_state_dict took Adam's state for AdamAR")
    except ValueError as e:
        assert "written by 'Adam'" in str(e) and "table 't" in str(e), str(e)
    _assert_equal_shards(before, _local_shards(target), "model after refused loads (no partial load)", 0.0)

    checked = _resume_and_compare(path, "table_wise")
    return {"restored": restored, "checked": checked, "errors": errors}


def one_rank_worker(rank: int, path: str) -> Dict[str, Any]:
    return {"checked": _resume_and_compare(path, "table_wise")}


def test_checkpoint_reshards_and_refuses_foreign_state(tmp_path: Path) -> None:
    path = str(tmp_path)
    two = run_ranks(save_and_reshard_worker, path)
    assert all(r["restored"] > 0 and r["checked"] > 0 for r in two), two
    one = run_ranks(one_rank_worker, path, world=1)
    assert one[0]["checked"] >= 3 * 6, one  # 3 tables x (weight + 4 states) + the uninterrupted comparison


def data_parallel_worker(rank: int, path: str) -> Dict[str, Any]:
    from torchrec_adaptive.distributed import checkpoint

    data = global_batches(BEFORE + AFTER, GLOBAL_BATCH)
    init = {f"ebc.{k}": v for k, v in make_ebc().state_dict().items()}
    every = _replicated("data_parallel")
    runs = {kind: _build(kind) for kind in ("data_parallel", "row_wise")}
    for kind, model in runs.items():
        model.load_state_dict(init)
        _train(model, data[:BEFORE])
        checkpoint.save(model, f"{path}/{kind}/step3")

    dp = runs["data_parallel"]
    # Replicated, not sharded: plain tensors of the global shape, the same on both ranks.
    sd, ost = dp.state_dict(), dp.fused_optimizer.state_dict()["state"]
    for n, rows, dim, _ in TABLES:
        w = sd[f"ebc.embedding_bags.{n}.weight"]
        assert not isinstance(w, ShardedTensor) and tuple(w.shape) == (rows, dim), (n, type(w), tuple(w.shape))
        for slot, shape in (("momentum1", (rows, dim)), ("exp_avg_sq", (rows, dim)), ("prev_iter", (rows,)),
                            ("row_count", (rows,))):
            v = ost[f"ebc.embedding_bags.{n}.weight"][f"{n}.{slot}"]
            assert not isinstance(v, ShardedTensor) and tuple(v.shape) == shape, (n, slot, type(v))
    identical = assert_replicas_identical(dp, every)
    # Round trip: a fresh data-parallel model (its own random init) gets exactly the saved state.
    saved = _local_shards(dp, every)
    fresh = _build("data_parallel")
    assert not torch.equal(saved["ebc.embedding_bags.t0.weight"][0], fresh.state_dict()["ebc.embedding_bags.t0.weight"]), \
        "the fresh model already equals the trained one; the round trip would be vacuous"
    checkpoint.load(fresh, f"{path}/data_parallel/step3")
    restored = _assert_equal_shards(saved, _local_shards(fresh, every), "data-parallel round trip", 0.0)

    for kind, model in runs.items():  # the uninterrupted runs
        _train(model, data[BEFORE:])
        checkpoint.save(model, f"{path}/{kind}/step5")
    checked = _resume_and_compare(f"{path}/data_parallel", "row_wise")
    checked += _resume_and_compare(f"{path}/row_wise", "data_parallel")
    return {"identical": identical, "restored": restored, "checked": checked}


def test_data_parallel_checkpoint_round_trip_and_reshard(tmp_path: Path) -> None:
    results = run_ranks(data_parallel_worker, str(tmp_path))
    assert all(r["identical"] > 0 and r["restored"] > 0 and r["checked"] > 0 for r in results), results
