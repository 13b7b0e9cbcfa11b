"""Slot names: FBGEMM's where the quantity is FBGEMM's, in FBGEMM's order, and state saved under the
previous names (``momentum``, ``exp_avg``, ``row_last_step``) still loads: unsharded optimizers,
the kernel's ``state_dict``, and DCP checkpoints of a sharded model (2 gloo ranks).

A checkpoint of the previous names is made the way the previous code wrote one: our
``checkpoint.state_dict`` with each renamed slot under its old key, saved by ``dcp.save``.
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.sharded_tensor import ShardedTensor

import torchrec_adaptive as ta
from torchrec_adaptive import AdaptiveTBE, TableSpec

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

# current -> previous slot names, spelled out (not read from the code under test)
OLD = {"momentum1": "exp_avg", "prev_iter": "row_last_step"}  # Adam / AdamAR
OLD_ADAGRAD = {"momentum1": "momentum", "prev_iter": "row_last_step"}  # row-wise Adagrad
RULES = [(ta.AdamAR, {"lr": 0.05, "alpha": 0.01}, OLD), (ta.RowWiseAdagrad, {"lr": 0.1}, OLD_ADAGRAD)]


@pytest.mark.parametrize("cls,expected", [
    (ta.RowWiseAdagrad, ("momentum1", "prev_iter", "row_count")),
    (ta.Adam, ("momentum1", "exp_avg_sq", "prev_iter", "row_count")),
    (ta.AdamAR, ("momentum1", "exp_avg_sq", "prev_iter", "row_count")),
    (ta.RowWiseRMSpropAR, ("momentum1", "prev_iter", "row_count")),
])
def test_slots_carry_fbgemms_names_first(cls, expected):
    """TorchRec names a table's first state momentum1: it must be the slot called so."""
    rule = cls.rule_config(lr=0.1)
    assert tuple(s.name for s in rule.build().slots()) == expected
    k = AdaptiveTBE([TableSpec("t", 5, 4)], rule)
    assert tuple(k.get_optimizer_state()[0]) == expected


def _renamed(slots: Dict[str, Any], old: Dict[str, str]) -> Dict[str, Any]:
    return {old.get(k, k): v for k, v in slots.items()}


@pytest.mark.parametrize("cls,kwargs,old", RULES)
def test_unsharded_state_with_previous_names_loads(cls, kwargs, old):
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = cls([p], **kwargs)
    p.grad = torch.randn(6, 4)
    opt.step()
    saved = opt.state_dict()
    saved["state"] = {i: _renamed(s, old) for i, s in saved["state"].items()}
    assert set(old.values()) <= set(saved["state"][0]), "the old names are not in the saved state: vacuous"
    q = torch.nn.Parameter(torch.zeros(6, 4))
    other = cls([q], **kwargs)
    other.load_state_dict(saved)
    assert sorted(other.state[q]) == sorted(opt.state[p])
    for name, value in opt.state[p].items():
        assert torch.equal(other.state[q][name], value) and other.state[q][name].dtype == value.dtype, name


@pytest.mark.parametrize("cls,kwargs,old", RULES)
def test_kernel_state_dict_with_previous_names_loads(cls, kwargs, old):
    rule = cls.rule_config(**kwargs)
    a = AdaptiveTBE([TableSpec("t", 10, 4)], rule)
    a(torch.tensor([3, 3, 5]), torch.tensor([0, 2, 3])).sum().backward()
    saved = {(f"state_{old[k[6:]]}" if k.startswith("state_") and k[6:] in old else k): v
             for k, v in a.state_dict().items()}  # the kernel keeps slot s in the buffer state_<s>
    assert {f"state_{o}" for o in old.values()} <= set(saved)
    b = AdaptiveTBE([TableSpec("t", 10, 4)], rule)
    b.load_state_dict(saved)  # strict
    for got, want in zip(b.get_optimizer_state(), a.get_optimizer_state()):
        assert sorted(got) == sorted(want) and all(torch.equal(got[n], want[n]) for n in want)
    assert b.optimizer_step == a.optimizer_step == 1


def _local(model: Any) -> Dict[str, torch.Tensor]:
    """This rank's shards of every weight and optimizer state, and each table's step k."""
    out: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        for shard in value.local_shards():
            out[f"{key}@{shard.metadata.shard_offsets}"] = shard.tensor.detach().clone()
    for param, slots in model.fused_optimizer.state_dict()["state"].items():
        for key, value in slots.items():
            if isinstance(value, ShardedTensor):
                for shard in value.local_shards():
                    out[f"{key}@{shard.metadata.shard_offsets}"] = shard.tensor.detach().clone()
            elif isinstance(value, dict):
                out[f"{key}.step"] = value["step"].clone()
    return out


def previous_names_worker(rank: int, path: str) -> Dict[str, Any]:
    from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward

    from torchrec_adaptive.distributed import checkpoint

    def build(cls: type, kwargs: Dict[str, Any]) -> Any:
        ebc = make_ebc()
        apply_optimizer_in_backward(cls, ebc.embedding_bags.parameters(), dict(kwargs))
        return shard_with_plan(Wrapper(ebc), ebc, per_param_sharding("row_wise"))

    w = head_weight(sum(d * len(fs) for _, _, d, fs in TABLES))
    checked: List[int] = []
    for i, (cls, kwargs, old) in enumerate(RULES):
        model = build(cls, kwargs)
        for lengths, ids in global_batches(2, WORLD_SIZE * BATCH_PER_RANK):
            loss_of(model(kjt_for(lengths, ids, rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)), w).backward()
        state = checkpoint.state_dict(model)
        state["optim"]["state"] = {
            param: {f"{k.rpartition('.')[0]}.{old.get(k.rpartition('.')[2], k.rpartition('.')[2])}": v
                    for k, v in slots.items()}
            for param, slots in state["optim"]["state"].items()}
        dcp.save(state, checkpoint_id=f"{path}/old_{i}")  # what the previous code wrote
        keys = dcp.FileSystemReader(f"{path}/old_{i}").read_metadata().state_dict_metadata
        assert any(k.endswith(f"t0.{old['momentum1']}") for k in keys), sorted(keys)
        fresh = build(cls, kwargs)
        checkpoint.load(fresh, f"{path}/old_{i}", verify_files=False)
        want, got = _local(model), _local(fresh)
        assert sorted(got) == sorted(want), (sorted(got), sorted(want))
        moved = [k for k in want if not torch.equal(got[k], want[k])]
        assert not moved, f"{cls.__name__}: not loaded from the previous names: {moved}"
        assert any(t.count_nonzero() for k, t in want.items() if "momentum1" in k), "zero state: vacuous"
        checked.append(len(want))
    return {"checked": checked}


@pytest.mark.distributed
def test_checkpoint_with_previous_slot_names_loads(tmp_path):
    results = run_ranks(previous_names_worker, str(tmp_path), timeout=300.0)
    assert all(all(n > 0 for n in r["checked"]) for r in results), results
