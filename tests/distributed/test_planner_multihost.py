"""Planning a 2-host x 2-GPU job from one process, with no process group (a dry run).

``plan()`` builds TorchRec's ``Topology`` with the job's ranks per host (torchrun's
``LOCAL_WORLD_SIZE``), not the world size: planned as one 4-GPU host, the plan would
place rank 3's shards on ``cuda:3`` (a host of this job has two GPUs) and cost every
collective at the intra-host bandwidth. TorchRec's planner plans for a ``Topology``
alone, so the job needs no processes here.
"""

from __future__ import annotations

from typing import Dict

import pytest
import torch
from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.types import ShardingType
from torchrec.optim import RowWiseAdagrad as StockRowWiseAdagrad

import torchrec_adaptive as ta
from torchrec_adaptive.distributed import AdaptiveKernelEstimator, adaptive_constraints, adaptive_planner, sharders
from torchrec_adaptive.distributed.planner import topology

HOSTS, PER_HOST = 2, 2
WORLD = HOSTS * PER_HOST
HBM = 80 * 2**30
RW = ShardingType.ROW_WISE.value


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        sizes = {"big": 2_000_000, "mid": 300_000, "small": 5_000, "stock": 100_000}
        self.ebc = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=64, feature_names=[f"f_{n}"])
                    for n, r in sizes.items()], device=torch.device("meta"))
        for n in ("big", "mid", "small"):
            apply_optimizer_in_backward(ta.AdamAR, [self.ebc.embedding_bags[n].weight], {"lr": 1e-3, "alpha": 1e-3})
        apply_optimizer_in_backward(StockRowWiseAdagrad, [self.ebc.embedding_bags["stock"].weight], {"lr": 0.01})


def test_two_hosts_of_two_gpus_plan_without_processes():
    model = _Model()
    topo = topology(WORLD, "cuda", local_world_size=PER_HOST, hbm_cap=HBM)
    assert (topo.world_size, topo.local_world_size, topo.compute_device) == (WORLD, PER_HOST, "cuda")
    assert all(d.storage.hbm == HBM for d in topo.devices)
    plan = adaptive_planner(model, topo, batch_size=2048).plan(
        model, sharders(offer_customized_kernel=True, offer_data_parallel=True))
    tables = plan.plan["ebc"]
    assert sorted(tables) == ["big", "mid", "small", "stock"]
    ranks = set()
    for name, ps in tables.items():
        assert ps.compute_kernel == ("fused" if name == "stock" else "customized_kernel"), (name, ps.compute_kernel)
        for p in ps.sharding_spec.shards if ps.sharding_spec is not None else []:
            rank = p.placement.rank()
            ranks.add(rank)
            # each host has cuda:0 and cuda:1; rank r is GPU r mod 2 of host r // 2
            assert str(p.placement) == f"rank:{rank}/cuda:{rank % PER_HOST}", (name, str(p.placement))
    assert ranks <= set(range(WORLD)) and len(ranks) >= 2, ranks


def _row_wise_comms(topo) -> Dict[str, float]:
    model = _Model()
    cons = adaptive_constraints(model)
    options = EmbeddingEnumerator(topo, 2048, cons, estimator=AdaptiveKernelEstimator(topo, cons)).enumerate(
        model, sharders(offer_customized_kernel=True))
    return {so.name: sum(s.perf.fwd_comms + s.perf.bwd_comms for s in so.shards)
            for so in options if so.sharding_type == RW and so.compute_kernel == "customized_kernel"}


def test_the_cost_model_sees_the_link_between_hosts():
    """A row-wise table's all-to-all crosses hosts in a 2 x 2 job: it must cost more than
    in the same 4 GPUs on one host (TorchRec's inter-host bandwidth is far below intra-host)."""
    two_hosts = _row_wise_comms(topology(WORLD, "cuda", local_world_size=PER_HOST, hbm_cap=HBM))
    one_host = _row_wise_comms(topology(WORLD, "cuda", local_world_size=WORLD, hbm_cap=HBM))
    assert sorted(two_hosts) == ["big", "mid", "small"]
    for name in two_hosts:
        assert two_hosts[name] > 2 * one_host[name], (name, two_hosts[name], one_host[name])


def test_ranks_per_host_come_from_torchrun(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(PER_HOST))
    assert topology(WORLD).local_world_size == PER_HOST
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert topology(WORLD).local_world_size == WORLD  # not under torchrun: one host
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert topology(2).local_world_size == 2  # a group smaller than a host
    with pytest.raises(ValueError, match=r"3 ranks per host \(LOCAL_WORLD_SIZE.*does not divide the world size 4"):
        topology(WORLD, local_world_size=3)
