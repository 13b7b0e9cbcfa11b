"""Bad input to a sharded model, per-table kernel options, and the epoch in checkpoints
(issue 12, items 3, 6 and 8), on 2 gloo ranks.

* an out-of-range ID is reported in the whole table's terms (row-wise sharding used to
  say ``ID 50 ... [0, 50)`` for ID 100 of a 100-row table, and ``ID 2^63 - 1`` for -1);
* an empty batch on every rank trains nothing and changes nothing;
* VBE and non-float per-sample weights are refused at the input, naming the features;
* ``nonfinite`` / ``bounds_check`` / ``backend`` / ``sync_check_interval`` are set per table (optimizer kwargs) or for all our
  tables (the sharder), validated with the table's name;
* the epoch (FAL's m_r(e)) is restored by ``checkpoint.load``; older checkpoints without it load.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from .harness import BATCH_PER_RANK, WORLD_SIZE, TABLES, Wrapper, feature_rows, global_batches, kjt_for, make_ebc, \
    run_ranks

pytestmark = pytest.mark.distributed


def _dmp(ebc: EmbeddingBagCollection, per_param: Dict[str, Any], **sharder_kw: Any) -> DistributedModelParallel:
    from torchrec_adaptive.distributed import AdaptiveEmbeddingBagCollectionSharder, sharders

    module_plan = construct_module_sharding_plan(
        ebc, per_param_sharding=per_param, local_size=WORLD_SIZE, world_size=WORLD_SIZE, device_type="cpu",
        sharder=AdaptiveEmbeddingBagCollectionSharder())
    return DistributedModelParallel(Wrapper(ebc), env=ShardingEnv.from_process_group(dist.group.WORLD),
                                    device=torch.device("cpu"), plan=ShardingPlan({"ebc": module_plan}),
                                    sharders=sharders(**sharder_kw))


def _kernels(model: torch.nn.Module) -> List[Any]:
    from torchrec_adaptive.epochs import all_modules
    from torchrec_adaptive.kernels import AdaptiveTBE

    return [m for m in all_modules(model) if isinstance(m, AdaptiveTBE)]


def _state(model: torch.nn.Module) -> List[Dict[str, Any]]:
    return [{"w": k.weights.detach().clone(), "k": k.optimizer_step, **{n: b.clone() for n, b in k.named_buffers()}}
            for k in _kernels(model)]


def _same(a: List[Dict[str, Any]], b: List[Dict[str, Any]]) -> None:
    for x, y in zip(a, b):
        for key in x:
            assert (torch.equal(x[key], y[key]) if isinstance(x[key], torch.Tensor) else x[key] == y[key]), key


def _batch_with(feature: str, bad_id: int) -> KeyedJaggedTensor:
    """Two samples per feature, one ID each; ``feature``'s first ID is ``bad_id``."""
    keys = [f for f, _ in feature_rows()]
    values = torch.tensor([bad_id if (k == feature and j == 0) else 1 for k in keys for j in range(2)])
    return KeyedJaggedTensor(keys=keys, values=values, lengths=torch.ones(2 * len(keys), dtype=torch.long))


def input_worker(rank: int) -> Dict[str, Any]:
    import torchrec_adaptive as tra

    ebc = make_ebc()
    apply_optimizer_in_backward(tra.AdamAR, ebc.embedding_bags.parameters(), {"lr": 0.05, "alpha": 1e-2})
    model = _dmp(ebc, {n: row_wise() for n, *_ in TABLES})
    before = _state(model)
    rows = dict(feature_rows())
    for bad in (rows["f0"], -1, 10**12):  # every rank gets the bad ID: each raises before any collective
        with pytest.raises(IndexError, match=rf"feature 'f0' \(table 't0'\): ID {bad} is out of range \[0, 40\)"):
            model(_batch_with("f0", bad))
    with pytest.raises(IndexError, match=r"feature 'f2' \(table 't1'\): ID 61 is out of range \[0, 61\)"):
        model(_batch_with("f2", 61))
    _same(before, _state(model))
    # an empty batch on every rank
    empty = KeyedJaggedTensor(keys=[f for f, _ in feature_rows()], values=torch.empty(0, dtype=torch.long),
                              lengths=torch.empty(0, dtype=torch.long))
    out = model(empty)
    assert out.shape[0] == 0
    out.sum().backward()
    _same(before, _state(model))
    # VBE: rank-0-style stride per key (2 samples for f0, 1 for the others)
    vbe = KeyedJaggedTensor(keys=[f for f, _ in feature_rows()], values=torch.ones(5, dtype=torch.long),
                            lengths=torch.ones(5, dtype=torch.long), stride_per_key_per_rank=[[2], [1], [1], [1]])
    with pytest.raises(NotImplementedError, match=r"features \['f0', 'f1', 'f2', 'f3'\].*VBE"):
        model(vbe)
    # training goes on
    (lengths, ids), = global_batches(1, WORLD_SIZE * BATCH_PER_RANK)
    model(kjt_for(lengths, ids, rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)).sum().backward()
    assert all(k.optimizer_step == 1 for k in _kernels(model))

    # non-float per-sample weights of a weighted EBC
    torch.manual_seed(0)
    webc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="w0", num_embeddings=20, embedding_dim=8,
                                                             feature_names=["g0"])], is_weighted=True)
    apply_optimizer_in_backward(tra.Adam, webc.embedding_bags.parameters(), {"lr": 0.01})
    from torchrec_adaptive.distributed import AdaptiveEmbeddingBagCollectionSharder, sharders
    wplan = construct_module_sharding_plan(webc, per_param_sharding={"w0": row_wise()}, local_size=WORLD_SIZE,
                                           world_size=WORLD_SIZE, device_type="cpu",
                                           sharder=AdaptiveEmbeddingBagCollectionSharder())
    wmodel = DistributedModelParallel(webc, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                      device=torch.device("cpu"), plan=ShardingPlan({"": wplan}), sharders=sharders())
    kjt = KeyedJaggedTensor(keys=["g0"], values=torch.tensor([1, 2]), lengths=torch.tensor([1, 1]),
                            weights=torch.tensor([2, 3]))
    with pytest.raises(TypeError, match=r"per-sample weights of features \['g0'\] must be floating point"):
        wmodel(kjt)
    return {"ok": True}


def options_worker(rank: int) -> Dict[str, Any]:
    import torchrec_adaptive as tra

    # t0: its own options; t1, t2: the sharder's defaults
    ebc = make_ebc()
    apply_optimizer_in_backward(tra.AdamAR, [ebc.embedding_bags["t0"].weight],
                                {"lr": 0.05, "nonfinite": "skip", "bounds_check": "warn", "backend": "eager",
                                 "sync_check_interval": 5})
    apply_optimizer_in_backward(tra.AdamAR, [ebc.embedding_bags["t1"].weight, ebc.embedding_bags["t2"].weight],
                                {"lr": 0.05})
    model = _dmp(ebc, {n: row_wise() for n, *_ in TABLES}, nonfinite="skip", bounds_check="off")
    got = {t.table_name: (k.nonfinite, k.bounds_check) for k in _kernels(model) for t in k.layout.tables}
    assert got == {"t0": ("skip", "warn"), "t1": ("skip", "off"), "t2": ("skip", "off")}, got
    runs = {t.table_name: (k.options.backend, k.options.sync_check_interval, k.update_path().backend)
            for k in _kernels(model) for t in k.layout.tables}
    assert runs == {"t0": ("eager", 5, "eager"), "t1": (None, 1, "cpu"), "t2": (None, 1, "cpu")}, runs
    # warn: the global ID in the warning, clamped, and the step trains
    with pytest.warns(RuntimeWarning, match=r"feature 'f0' \(table 't0'\): ID 45 is out of range \[0, 40\).*clamped"):
        out = model(_batch_with("f0", 45))
    out.sum().backward()
    assert all(k.optimizer_step == 1 for k in _kernels(model))
    # skip: the step is skipped in every kernel alike, nothing raised, k in step
    before = _state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        (model(_batch_with("f0", 1)).sum() * float("nan")).backward()
    after = _state(model)
    assert all(a["k"] == b["k"] + 1 for a, b in zip(after, before))
    for a, b in zip(after, before):
        assert torch.equal(a["w"], b["w"])
    # a bad option fails where it is written
    ebc = make_ebc()
    with pytest.raises(ValueError, match=r"nonfinite must be one of"):
        apply_optimizer_in_backward(tra.AdamAR, ebc.embedding_bags.parameters(), {"lr": 0.05, "nonfinite": "ignore"})
    with pytest.raises(ValueError, match="bounds_check must be one of"):
        tra.distributed.sharders(bounds_check="clip")
    with pytest.raises(ValueError, match="backend must be one of"):
        tra.sharders(backend="gpu")
    with pytest.raises(ValueError, match="sync_check_interval must be an integer >= 1"):
        apply_optimizer_in_backward(tra.AdamAR, ebc.embedding_bags.parameters(), {"lr": 0.05, "sync_check_interval": 0})
    return {"options": got}


def epoch_worker(rank: int, path: str) -> Dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    import torchrec_adaptive as tra
    from torchrec_adaptive.distributed import checkpoint

    def build() -> DistributedModelParallel:
        ebc = make_ebc()
        apply_optimizer_in_backward(tra.AdamAR, ebc.embedding_bags.parameters(),
                                    {"lr": 0.05, "fal_tau": 5.0, "fal_epoch_decay": 0.5})
        return _dmp(ebc, {"t0": row_wise(), "t1": table_wise(rank=1), "t2": table_wise(rank=0)})

    a = build()
    tra.start_epoch(a, 3)
    (lengths, ids), = global_batches(1, WORLD_SIZE * BATCH_PER_RANK)
    a(kjt_for(lengths, ids, rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK)).sum().backward()
    checkpoint.save(a, f"{path}/new")
    b = build()
    checkpoint.load(b, f"{path}/new")
    epochs = sorted({k.epoch for k in _kernels(b)})
    assert epochs == [3], epochs
    # a checkpoint written before the epoch was saved: no '<table>.optimizer_step.epoch' entries
    old = checkpoint.state_dict(a)
    for slots in old["optim"]["state"].values():
        for value in slots.values():
            if isinstance(value, dict):
                value.pop("epoch", None)
    dcp.save(old, checkpoint_id=f"{path}/old")
    c = build()
    checkpoint.load(c, f"{path}/old", verify_files=False)  # plain dcp.save: no manifest, as before issue 12
    assert sorted({k.epoch for k in _kernels(c)}) == [1]
    assert all(k.optimizer_step == 1 for k in _kernels(c))
    return {"epochs": epochs}


def test_bad_input_is_reported_in_table_terms_and_changes_nothing() -> None:
    run_ranks(input_worker)


def test_nonfinite_and_bounds_check_per_table() -> None:
    run_ranks(options_worker)


def test_checkpoint_restores_the_epoch(tmp_path: Path) -> None:
    results = run_ranks(epoch_worker, str(tmp_path))
    assert [r["epochs"] for r in results] == [[3], [3]]
