"""MLET sharded by DMP on 2 gloo ranks: trains like one process, gathers and collapses exactly.

Each rank builds the same MLET model (t0, t1 factorized, t2 passing through) with a
dense head, shards ``emb.inner`` (W tables on torchrec_adaptive's kernel, AdamAR in
backward; V and the head replicated by DDP, torch Adam), and trains on its half of
each global batch. A single-process copy of the same model trains on the whole
global batches (unsharded AdamAR front end on W). Then, on both ranks:

* the gathered W tables and V equal the single-process ones (the sharded training is
  MLET's, not just something that runs);
* ``collapse_sharded`` (every rank, and ``dst=0``) gives a stock EBC whose pooled
  outputs equal the sharded model's on the local batch to 1e-5.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec import EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan

from .harness import WORLD_SIZE, run_ranks

pytestmark = pytest.mark.distributed
STEPS = 6
BATCH_PER_RANK = 8
# Own tables (not the harness's, which other tests tune): (name, rows, dim, features).
TABLES: List[Tuple[str, int, int, List[str]]] = [
    ("t0", 40, 8, ["f0", "f1"]),
    ("t1", 61, 16, ["f2"]),
    ("t2", 30, 8, ["f3"]),
]
ADAMAR = {"lr": 0.02, "alpha": 1e-2}
DENSE_LR = 0.02


class Model(nn.Module):
    def __init__(self, emb: nn.Module, out_dim: int) -> None:
        super().__init__()
        self.emb = emb
        self.head = nn.Linear(out_dim, 1)

    def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(kjt).values())).squeeze(1)


def _build() -> Model:
    from torchrec_adaptive.mlet import MLETConfig, MLETEmbeddingBagCollection

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d, feature_names=f) for n, r, d, f in TABLES]
    # t0: 8 -> k 16 (two features), t1: 16 -> k 24, t2 passes through.
    emb = MLETEmbeddingBagCollection(tables, {"t0": MLETConfig(inner_dim=16, v_init_std=0.25),
                                              "t1": MLETConfig(inner_dim=24)})
    return Model(emb, sum(d * len(f) for _, _, d, f in TABLES))


def _plan(kind: str) -> Dict[str, Any]:
    if kind == "row_wise":
        return {n: row_wise() for n, *_ in TABLES}
    # "mixed": table-, column- and row-wise tables in one plan.
    return {"t0": table_wise(rank=1), "t1": column_wise(ranks=[1, 0]), "t2": row_wise()}


def global_batches(steps: int, batch: int, seed: int) -> List[Tuple[List[torch.Tensor], List[torch.Tensor]]]:
    """Per step, per feature: lengths [batch] (0-3, so empty bags occur) and skewed ids."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        lengths, ids = [], []
        for _, rows, _, fs in TABLES:
            for _ in fs:
                ln = torch.randint(0, 4, (batch,), generator=g)
                lengths.append(ln)
                ids.append((rows * torch.rand(int(ln.sum()), generator=g).pow(3)).long().clamp(max=rows - 1))
        out.append((lengths, ids))
    return out


def kjt_for(lengths: List[torch.Tensor], ids: List[torch.Tensor], lo: int, hi: int) -> KeyedJaggedTensor:
    """Samples [lo, hi) of a global batch as a KJT."""
    vals, lens = [], []
    for ln, v in zip(lengths, ids):
        offs = torch.cat([torch.zeros(1, dtype=torch.long), ln.cumsum(0)])
        vals.append(v[offs[lo]: offs[hi]])
        lens.append(ln[lo:hi])
    return KeyedJaggedTensor(keys=[f for *_, fs in TABLES for f in fs], values=torch.cat(vals), lengths=torch.cat(lens))


def _labels(step: int) -> torch.Tensor:
    return torch.rand(WORLD_SIZE * BATCH_PER_RANK, generator=torch.Generator().manual_seed(100 + step)).round()


def _loss(model: nn.Module, kjt: KeyedJaggedTensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.binary_cross_entropy_with_logits(model(kjt), y)


def mlet_worker(rank: int, kinds: List[str]) -> Dict[str, Any]:
    import torchrec_adaptive as tra
    from torchrec_adaptive.distributed import AdaptiveEmbeddingBagCollectionSharder
    from torchrec_adaptive.mlet import collapse, collapse_sharded, gather_inner_weights

    report: Dict[str, Any] = {}
    lo, hi = rank * BATCH_PER_RANK, (rank + 1) * BATCH_PER_RANK
    for kind in kinds:
        unsharded = _build()
        reference = copy.deepcopy(unsharded)
        apply_optimizer_in_backward(tra.AdamAR, unsharded.emb.inner.embedding_bags.parameters(), dict(ADAMAR))
        module_plan = construct_module_sharding_plan(
            unsharded.emb.inner, per_param_sharding=_plan(kind), local_size=WORLD_SIZE, world_size=WORLD_SIZE,
            device_type="cpu", sharder=AdaptiveEmbeddingBagCollectionSharder())
        model = DistributedModelParallel(unsharded, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                         device=torch.device("cpu"), plan=ShardingPlan({"emb.inner": module_plan}),
                                         sharders=tra.sharders())
        emb = model.module.emb
        kernels = {ps.compute_kernel for ps in emb.inner.module_sharding_plan.values()}
        assert kernels == {"customized_kernel"}, kernels
        dense = [p for n, p in model.module.named_parameters() if not n.startswith("emb.inner.")]
        assert len(dense) == 4, [n for n, _ in model.module.named_parameters()]  # V_t0, V_t1, head weight/bias
        opt = torch.optim.Adam(dense, lr=DENSE_LR)

        # The reference starts where the sharded model starts: DMP re-initialized the tables
        # (from the inner configs' Xavier bounds) and DDP broadcast rank 0's V and head.
        w_init = gather_inner_weights(emb, dst=None)
        assert w_init is not None
        xavier = {"t0": (40 + 16) ** -0.5 * 6 ** 0.5, "t1": (61 + 24) ** -0.5 * 6 ** 0.5, "t2": 30 ** -0.5}
        for n, w in w_init.items():  # the sharded kernels drew from the inner configs' bounds
            assert 0.5 * xavier[n] < w.abs().max().item() <= xavier[n], (n, w.abs().max().item(), xavier[n])
        with torch.no_grad():
            for n, w in w_init.items():
                reference.emb.inner.embedding_bags[n].weight.copy_(w)
            for n, p in emb.v.items():
                reference.emb.v[n].copy_(p)
            reference.head.load_state_dict(model.module.head.state_dict())
        apply_optimizer_in_backward(tra.AdamAR, reference.emb.inner.embedding_bags.parameters(), dict(ADAMAR))
        ref_opt = torch.optim.Adam([p for n, p in reference.named_parameters() if not n.startswith("emb.inner.")],
                                   lr=DENSE_LR)

        v_init = {n: p.detach().clone() for n, p in emb.v.items()}
        batches = global_batches(STEPS, WORLD_SIZE * BATCH_PER_RANK, seed=3)
        for step, (lengths, ids) in enumerate(batches):
            y = _labels(step)
            opt.zero_grad()
            _loss(model, kjt_for(lengths, ids, lo, hi), y[lo:hi]).backward()
            opt.step()
            ref_opt.zero_grad()
            _loss(reference, kjt_for(lengths, ids, 0, WORLD_SIZE * BATCH_PER_RANK), y).backward()
            ref_opt.step()

        # Sharded training is MLET training: W (gathered) and V equal the single-process run.
        w_after = gather_inner_weights(emb, dst=None)
        assert w_after is not None
        for n, w in w_after.items():
            moved = (w - w_init[n]).abs().max().item()
            assert moved > 1e-3, f"{kind}: table {n} barely trained ({moved:.2g})"
            torch.testing.assert_close(w, reference.emb.inner.embedding_bags[n].weight.detach(), atol=1e-5, rtol=1e-5,
                                       msg=lambda m, n=n: f"{kind}: W {n}: {m}")
        for n, p in emb.v.items():
            moved = (p.detach() - v_init[n]).abs().max().item()
            assert moved > 1e-3, f"{kind}: V {n} barely trained ({moved:.2g})"
            torch.testing.assert_close(p.detach(), reference.emb.v[n].detach(), atol=1e-5, rtol=1e-5,
                                       msg=lambda m, n=n: f"{kind}: V {n}: {m}")

        # Collapse: every rank, and to rank 0 only (the unsharded collapse refuses a sharded module).
        with pytest.raises(TypeError, match="collapse_sharded"):
            collapse(emb)
        ebc = collapse_sharded(emb)
        assert ebc is not None and type(ebc).__name__ == "EmbeddingBagCollection"
        to_zero = collapse_sharded(emb, dst=0)
        if rank == 0:
            assert to_zero is not None
            for k, v in ebc.state_dict().items():
                assert torch.equal(v, to_zero.state_dict()[k]), f"{kind}: dst=0 gather differs at {k}"
        else:
            assert to_zero is None
        eval_batch = global_batches(1, WORLD_SIZE * BATCH_PER_RANK, seed=77)[0]
        local = kjt_for(*eval_batch, lo, hi)
        with torch.no_grad():
            sharded_out = emb(local)
            collapsed_out = ebc(local)
        assert collapsed_out.keys() == sharded_out.keys() == ["f0", "f1", "f2", "f3"]
        assert collapsed_out.length_per_key() == sharded_out.length_per_key() == [8, 8, 16, 8]
        diff = (collapsed_out.values() - sharded_out.values()).abs().max().item()
        assert diff <= 1e-5, f"{kind}: collapsed vs sharded pooled outputs differ by {diff:.3g}"
        # The collapsed EBC also equals collapsing the single-process reference.
        ref_ebc = collapse(reference.emb)
        for k, v in ebc.state_dict().items():
            torch.testing.assert_close(v, ref_ebc.state_dict()[k], atol=1e-5, rtol=1e-5)
        report[kind] = {"max_diff": diff, "checksum": sum(v.double().sum().item() for v in ebc.state_dict().values())}
    return report


def test_mlet_sharded_train_gather_collapse() -> None:
    kinds = ["row_wise", "mixed"]
    results = run_ranks(mlet_worker, kinds)
    for kind in kinds:
        assert all(r[kind]["max_diff"] <= 1e-5 for r in results)
        assert results[0][kind]["checksum"] == results[1][kind]["checksum"]  # both ranks hold the same export
