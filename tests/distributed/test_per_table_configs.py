"""Per-table optimizer configs from separate ``apply_optimizer_in_backward`` calls.

t0 and t1 get AdamAR(lr_multiplier=1, alpha=1e-2); t2 gets AdamAR(lr_multiplier=5,
alpha=5e-2). On 2 gloo ranks under row_wise (both groups on every rank) and a mixed
plan, the sharded EBC must put the two configs in different kernels, hand each kernel
exactly its own RuleConfig, and train every table as the single-process kernel with
that table's own rule does (weights and all optimizer states to 1e-5 after 12 steps).
Controls check that training t2 with t0's rule, or with its own rule but kappa = 1,
gives different weights, so the comparison can tell the configs (and kappa alone) apart.
"""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch
import torch.distributed as dist
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan
from torchrec.distributed.types import ShardingEnv, ShardingPlan

import torchrec_adaptive as ta

from .harness import (
    BATCH_PER_RANK, TABLES, WORLD_SIZE, Wrapper, _kernels_of, check_against_reference, global_batches, head_weight,
    kjt_for, loss_of, make_ebc, per_param_sharding, run_ranks,
)

pytestmark = pytest.mark.distributed

STEPS, TOL = 12, 1e-5
SHARED = {"lr": 0.05, "alpha": 1e-2, "eps": 0.1}
T2 = {"lr": 0.05, "alpha": 5e-2, "eps": 0.1, "lr_multiplier": 5.0}
GROUPS = (("t0", "t1"), ("t2",))  # tables per config; features f0, f1 (t0), f2 (t1) | f3 (t2)


def _references(configs: Dict[str, Any], init: Dict[str, torch.Tensor]) -> list:
    """One single-process kernel per config group, as (kernel, tables, number of features)."""
    refs = []
    for tables in GROUPS:
        specs = [ta.TableSpec(n, r, d) for n, r, d, _ in TABLES if n in tables]
        ftm = [i for i, (n, *_, fs) in enumerate(t for t in TABLES if t[0] in tables) for _ in fs]
        ref = ta.AdaptiveTBE(specs, ta.AdamAR.rule_config(**configs[tables[0]]), feature_table_map=ftm)
        with torch.no_grad():
            for n, w in zip(tables, ref.split_embedding_weights()):
                w.copy_(init[f"embedding_bags.{n}.weight"])
        refs.append((ref, tables, len(ftm)))
    return refs


def _train_references(refs: list, data: list) -> None:
    w_head = head_weight(sum(d * len(fs) for _, _, d, fs in TABLES))
    for lengths, ids in data:
        g = kjt_for(lengths, ids, 0, WORLD_SIZE * BATCH_PER_RANK)
        parts = g.split([n for _, _, n in refs])
        out = torch.cat([ref(p.values(), p.offsets()) for (ref, _, _), p in zip(refs, parts)], dim=1)
        loss_of(out, w_head).backward()


def per_table_worker(rank: int) -> Dict[str, Any]:
    from torchrec_adaptive.distributed import ADAPTIVE_RULE_KEY, AdaptiveEmbeddingBagCollectionSharder, sharders

    configs = {"t0": SHARED, "t1": SHARED, "t2": T2}
    data = global_batches(STEPS, WORLD_SIZE * BATCH_PER_RANK)
    w_head = head_weight(sum(d * len(fs) for _, _, d, fs in TABLES))
    lo, hi = rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK
    checked: Dict[str, int] = {}
    for sharding_type in ("row_wise", "mixed"):
        ebc = make_ebc()
        init = {k: v.detach().clone() for k, v in ebc.state_dict().items()}
        bags = ebc.embedding_bags
        apply_optimizer_in_backward(ta.AdamAR, [bags["t0"].weight, bags["t1"].weight], dict(SHARED))
        apply_optimizer_in_backward(ta.AdamAR, [bags["t2"].weight], dict(T2))
        plan = construct_module_sharding_plan(
            ebc, per_param_sharding=per_param_sharding(sharding_type), local_size=WORLD_SIZE, world_size=WORLD_SIZE,
            device_type="cpu", sharder=AdaptiveEmbeddingBagCollectionSharder())
        model = DistributedModelParallel(Wrapper(ebc), env=ShardingEnv.from_process_group(dist.group.WORLD),
                                         device=torch.device("cpu"), plan=ShardingPlan({"ebc": plan}),
                                         sharders=sharders())
        model.load_state_dict({f"ebc.{k}": v for k, v in init.items()})
        # Each table's kernel runs exactly its own config; the two configs never share a kernel.
        kernels: Dict[int, set] = {}
        for lookup in model.module.ebc._lookups:
            for emb in getattr(lookup, "module", lookup)._emb_modules:
                names = {t.name for t in emb.config.embedding_tables}
                rule = emb.config.fused_params[ADAPTIVE_RULE_KEY]
                assert type(emb).__name__ == "ShardedAdaptiveTBE", type(emb)
                for n in names:
                    assert rule == ta.AdamAR.rule_config(**configs[n]), (sharding_type, n, rule)
                assert names <= {"t0", "t1"} or names == {"t2"}, f"{sharding_type}: {names} share one kernel"
                kernels[id(emb)] = names
        assert _kernels_of(model), "no kernel found"
        if sharding_type == "row_wise":  # every table has rows on every rank: both configs, two kernels
            assert sorted(map(sorted, kernels.values())) == [["t0", "t1"], ["t2"]], kernels
        for lengths, ids in data:
            loss_of(model(kjt_for(lengths, ids, lo, hi)), w_head).backward()
        refs = _references(configs, init)
        _train_references(refs, data)
        n = sum(check_against_reference(model, ref, STEPS, TOL, tables) for ref, tables, _ in refs)
        checked[sharding_type] = n

    # Control: t2 trained with t0's rule ends elsewhere (the check above can tell the configs apart).
    init = {k: v.detach().clone() for k, v in make_ebc().state_dict().items()}
    own, same = _references(configs, init), _references({"t0": SHARED, "t1": SHARED, "t2": SHARED}, init)
    _train_references(own, data)
    _train_references(same, data)
    gap = (own[1][0].split_embedding_weights()[0] - same[1][0].split_embedding_weights()[0]).abs().max().item()
    assert gap > 100 * TOL, f"t2's own config barely changes its training (gap {gap:.2g}); the test would be vacuous"
    # ... and kappa alone (same alpha) also moves it: a kernel ignoring lr_multiplier would fail above.
    no_kappa = _references({**configs, "t2": {**T2, "lr_multiplier": 1.0}}, init)
    _train_references(no_kappa, data)
    kappa_gap = (own[1][0].split_embedding_weights()[0] - no_kappa[1][0].split_embedding_weights()[0]).abs().max().item()
    assert kappa_gap > 100 * TOL, f"t2's lr_multiplier barely changes its training (gap {kappa_gap:.2g})"
    return {"checked": checked, "gap": gap, "kappa_gap": kappa_gap}


def test_per_table_configs_group_and_train_with_their_own_rule() -> None:
    results = run_ranks(per_table_worker)
    for st in ("row_wise", "mixed"):
        assert sum(r["checked"][st] for r in results) >= 3 * 5, results
