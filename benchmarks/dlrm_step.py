"""Training throughput of TorchRec's DLRM on 2 gloo ranks: stock fused row-wise Adagrad
(FBGEMM, via ``torchrec.optim.RowWiseAdagrad``) vs our AdamAR and FAL-on-AdamAR.

    .venv/bin/python benchmarks/dlrm_step.py            # 26 tables x 100k rows x dim 64, batch 2048 per rank
    .venv/bin/python benchmarks/dlrm_step.py --quick    # 26 x 10k x 16, batch 256 per rank (smoke run)
    .venv/bin/python benchmarks/dlrm_step.py --json out.json

Every case is the same ``torchrec.models.dlrm.DLRM`` (13 dense features, dense arch
512-256-64, over arch 512-512-256-1, torch Adagrad on the dense part through
DistributedModelParallel's DDP), the same tables with the same table-wise plan
(table i on rank i % 2, compute kernel ``fused``; our sharder reroutes our tables to
our kernel), the same batches (pooling factor 1 per sparse feature, Zipf(1.05) IDs)
and the same loss (BCE with logits). Only the optimizer of the embedding tables
(``apply_optimizer_in_backward``) differs. All cases live in the same 2 processes
and are timed round-robin (each round runs ``--steps`` steps of each case in turn,
between barriers), so this VM's drifts hit all cases alike; the report is the median
over rounds of global samples/s and its ratio to stock.

The worker processes get ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296``
(set before they are spawned, so glibc reads them at start) for every case alike;
``--no-malloc-env`` leaves them out. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Dict, List

from torchrec_adaptive.kernels.host_memory import MALLOC_ENV

WORLD = 2
DENSE_IN = 13


@dataclass
class Shape:
    tables: int = 26
    rows: int = 100_000
    dim: int = 64
    batch_per_rank: int = 2048
    pooling: int = 1
    zipf: float = 1.05


CASES = ["stock RowWiseAdagrad (FBGEMM fused)", "ours AdamAR", "ours FAL+AdamAR"]


def _optimizer(case: str):
    import torchrec.optim as trec_optim

    import torchrec_adaptive as tra

    if case.startswith("stock"):
        return trec_optim.RowWiseAdagrad, {"lr": 0.01, "eps": 1e-8}
    if case == "ours AdamAR":
        return tra.AdamAR, {"lr": 1e-3, "alpha": 1e-3}
    return tra.AdamAR, {"lr": 1e-3, "alpha": 1e-3, "fal_tau": 10.0}


def _build(case: str, shape: Shape):
    import torch
    import torch.distributed as dist
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.models.dlrm import DLRM
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    from torchrec_adaptive.distributed import AdaptiveEmbeddingBagCollectionSharder, sharders
    from torchrec.distributed.embedding_kernel import BaseEmbedding
    from torchrec_adaptive.distributed.shards import all_modules

    torch.manual_seed(0)
    configs = [EmbeddingBagConfig(name=f"t{i}", num_embeddings=shape.rows, embedding_dim=shape.dim,
                                  feature_names=[f"f{i}"]) for i in range(shape.tables)]
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    cls, kwargs = _optimizer(case)
    apply_optimizer_in_backward(cls, ebc.parameters(), kwargs)
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE_IN, dense_arch_layer_sizes=[512, 256, shape.dim],
                 over_arch_layer_sizes=[512, 512, 256, 1], dense_device=torch.device("cpu"))
    fused = EmbeddingComputeKernel.FUSED.value
    plan = construct_module_sharding_plan(
        ebc, per_param_sharding={c.name: table_wise(rank=i % WORLD, compute_kernel=fused) for i, c in enumerate(configs)},
        local_size=WORLD, world_size=WORLD, device_type="cpu", sharder=AdaptiveEmbeddingBagCollectionSharder())
    # One sharder list for all cases: for stock tables ours is TorchRec's EBC sharder.
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                   device=torch.device("cpu"), plan=ShardingPlan({"sparse_arch.embedding_bag_collection": plan}),
                                   sharders=sharders())
    dense_opt = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                      lambda params: torch.optim.Adagrad(params, lr=0.01))
    return dmp, dense_opt


def _batches(shape: Shape, rank: int, count: int) -> List[Any]:
    import torch
    from torchrec import KeyedJaggedTensor

    g = torch.Generator().manual_seed(1000 + rank)
    p = 1.0 / torch.arange(1, shape.rows + 1, dtype=torch.float64) ** shape.zipf
    perms = [torch.randperm(shape.rows, generator=torch.Generator().manual_seed(t)) for t in range(shape.tables)]
    out = []
    b, n = shape.batch_per_rank, shape.batch_per_rank * shape.pooling
    for _ in range(count):
        ids = torch.cat([perms[t][torch.multinomial(p, n, replacement=True, generator=g)] for t in range(shape.tables)])
        kjt = KeyedJaggedTensor(keys=[f"f{t}" for t in range(shape.tables)], values=ids,
                                lengths=torch.full((shape.tables * b,), shape.pooling, dtype=torch.int64))
        dense = torch.randn(b, DENSE_IN, generator=g)
        labels = torch.randint(0, 2, (b,), generator=g).float()
        out.append((dense, kjt, labels))
    return out


def _worker(rank: int, port: int, shape: Shape, args: Dict[str, Any], q: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist
    from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag

    from torchrec_adaptive.distributed.shards import all_modules

    torch.set_num_threads(1)  # 2 ranks on this VM's 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        loss_fn = torch.nn.BCEWithLogitsLoss()
        models = [_build(case, shape) for case in CASES]
        batches = _batches(shape, rank, 4)
        step_no = [0] * len(CASES)

        def run(i: int, n: int) -> None:
            model, dense_opt = models[i]
            for _ in range(n):
                dense, kjt, labels = batches[step_no[i] % len(batches)]
                step_no[i] += 1
                dense_opt.zero_grad()
                loss = loss_fn(model(dense, kjt).squeeze(-1), labels)
                loss.backward()
                dense_opt.step()

        kernels = []
        for model, _ in models:  # what each case really runs: FBGEMM's TBE or our kernel
            ebc = model.module.sparse_arch.embedding_bag_collection
            kernels.append(sorted({type(emb).__name__ for emb in all_modules(ebc) if isinstance(emb, BaseBatchedEmbeddingBag)}))
        for i in range(len(CASES)):
            run(i, args["warmup"])
        times: List[List[float]] = [[] for _ in CASES]
        for _ in range(args["rounds"]):
            for i in range(len(CASES)):
                dist.barrier()
                t0 = time.perf_counter()
                run(i, args["steps"])
                dist.barrier()
                times[i].append((time.perf_counter() - t0) / args["steps"])
        q.put((rank, times, {k: os.environ.get(k) for k in MALLOC_ENV}, kernels))
    finally:
        dist.destroy_process_group()


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="26 x 10k x 16, batch 256 per rank")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per case per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per case before the first round")
    ap.add_argument("--no-malloc-env", action="store_true", help="do not set MALLOC_* for the workers")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)
    shape = Shape(rows=10_000, dim=16, batch_per_rank=256) if args.quick else Shape()

    from ranks import run_ranks  # benchmarks/ranks.py (this script's directory is on sys.path)

    if not args.no_malloc_env:
        os.environ.update(MALLOC_ENV)  # inherited by the spawned workers, read by glibc at their start
    wargs = {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup}
    reports = run_ranks(_worker, shape, wargs, world=WORLD)  # rank -> (times, env, kernels)
    # A step ends for both ranks at the closing barrier: take the slower rank per round.
    per_case = [[max(reports[r][0][i][k] for r in range(WORLD)) for k in range(args.rounds)] for i in range(len(CASES))]
    global_batch = WORLD * shape.batch_per_rank
    import machine  # benchmarks/machine.py

    print(machine.header(machine.describe()) + f" (the {WORLD} workers: 1 torch thread each)")
    print(f"shape {asdict(shape)}, {WORLD} gloo ranks x 1 thread, table_wise, worker env {reports[0][1]}")
    for name, kinds in zip(CASES, reports[0][2]):
        print(f"  {name}: rank 0 runs {kinds}")
    assert reports[0][2][0] == ["BatchedFusedEmbeddingBag"], reports[0][2][0]
    assert all(k == ["ShardedAdaptiveTBE"] for k in reports[0][2][1:]), reports[0][2]
    base = global_batch / statistics.median(per_case[0])
    results = []
    for name, ts in zip(CASES, per_case):
        sps = global_batch / statistics.median(ts)
        spread = [round(global_batch / t) for t in ts]
        results.append({"case": name, "step_ms": statistics.median(ts) * 1e3, "samples_per_s": sps,
                        "vs_stock": sps / base, "per_round_samples_per_s": spread})
        print(f"{name:38s} step {statistics.median(ts) * 1e3:7.1f} ms  {sps:8.0f} samples/s  x{sps / base:5.2f} of stock  "
              f"(rounds: {min(spread)}..{max(spread)})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": asdict(shape), "env": reports[0][1], "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
