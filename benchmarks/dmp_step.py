"""One training step of an EmbeddingBagCollection through TorchRec's
DistributedModelParallel at world size 1: stock ``torchrec.optim.RowWiseAdagrad``
(FBGEMM's fused TBE) vs our rules (our kernel, via our sharder), same process, same batches.

    .venv/bin/python benchmarks/dmp_step.py --rounds 5           # 26 tables x 100k x 64, batch 4096, 1 ID per bag
    .venv/bin/python benchmarks/dmp_step.py --quick              # 26 x 10k x 16, batch 512 (smoke run)

What kernel_step.py measures on the bare kernels, through the whole TorchRec stack
(KeyedJaggedTensor input distribution, the sharded module's lookup, the
``apply_optimizer_in_backward`` fused update). The step is forward, ``(values * probe).sum()``
(a dense output gradient, as an MLP above hands back) and backward; cases timed
round-robin, medians compared. ``TORCHREC_ADAPTIVE_CPU_ISA=avx2`` measures our AVX2 build.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import kernel_step as ks  # noqa: E402
import machine  # noqa: E402

Shape = ks.Shape  # the same tables and batches as kernel_step.py


def _optimizers() -> dict[str, tuple[type, dict]]:
    import torchrec.optim as trec_optim

    import torchrec_adaptive as tra

    return {
        "stock RowWiseAdagrad (FBGEMM fused)": (trec_optim.RowWiseAdagrad, {"lr": 0.01, "eps": 1e-8}),
        "ours RowWiseAdagrad": (tra.RowWiseAdagrad, {"lr": 0.01}),
        "ours AdamAR": (tra.AdamAR, {"lr": 1e-3, "alpha": 1e-3}),
        "ours FAL+AdamAR": (tra.AdamAR, {"lr": 1e-3, "alpha": 1e-3, "fal_tau": 10.0}),
    }


def build(shape: Shape, cls: type, kwargs: dict) -> torch.nn.Module:
    import torch.distributed as dist
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed.embedding_types import EmbeddingComputeKernel
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from torchrec_adaptive.distributed import AdaptiveEmbeddingBagCollectionSharder, sharders

    torch.manual_seed(0)
    configs = [EmbeddingBagConfig(name=f"t{i}", num_embeddings=shape.rows, embedding_dim=shape.dim,
                                  feature_names=[f"f{i}"]) for i in range(shape.tables)]
    ebc = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    apply_optimizer_in_backward(cls, ebc.parameters(), kwargs)
    fused = EmbeddingComputeKernel.FUSED.value
    plan = construct_module_sharding_plan(
        ebc, per_param_sharding={c.name: table_wise(rank=0, compute_kernel=fused) for c in configs},
        local_size=1, world_size=1, device_type="cpu", sharder=AdaptiveEmbeddingBagCollectionSharder())
    # One sharder list for all cases: for stock tables ours is TorchRec's EBC sharder.
    return DistributedModelParallel(ebc, env=ShardingEnv.from_process_group(dist.group.WORLD), device=torch.device("cpu"),
                                    plan=ShardingPlan({"": plan}), sharders=sharders())


def batches(shape: Shape, count: int):
    """kernel_step's batches (pooling 1) as KeyedJaggedTensors: its IDs are feature-major, as KJT values."""
    from torchrec import KeyedJaggedTensor

    return [KeyedJaggedTensor(keys=[f"f{t}" for t in range(shape.tables)], values=idx,
                              lengths=torch.ones(shape.tables * shape.batch, dtype=torch.int64))
            for idx, _ in ks.make_batches(shape, 1, count, torch.device("cpu"))]


def kernels_of(model: torch.nn.Module) -> list[str]:
    """The TBE classes the sharded module really runs (FBGEMM's or ours)."""
    from torchrec.distributed.batched_embedding_kernel import BaseBatchedEmbeddingBag

    from torchrec_adaptive.distributed.shards import all_modules

    return sorted({type(m).__name__ for m in all_modules(model) if isinstance(m, BaseBatchedEmbeddingBag)})


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5, help="timed steps per case per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json")
    args = machine.parse_cpu_args(ap, argv)  # --threads, --no-malloc-env
    shape = Shape(rows=10_000, dim=16, batch=512) if args.quick else Shape()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        cases = _optimizers()
        models = {name: build(shape, cls, kw) for name, (cls, kw) in cases.items()}
        kinds = {name: kernels_of(m) for name, m in models.items()}
        assert all(k == ["BatchedFusedEmbeddingBag"] for n, k in kinds.items() if n.startswith("stock")), kinds
        assert all(k == ["ShardedAdaptiveTBE"] for n, k in kinds.items() if n.startswith("ours")), kinds
        data = batches(shape, 4)
        probe = torch.randn(shape.batch, shape.tables * shape.dim, generator=torch.Generator().manual_seed(1))
        info = machine.describe()
        print(machine.header(info))
        print(f"shape {asdict(shape)}, DMP world size 1 (gloo), table_wise, kernels {kinds}")

        def step(model: torch.nn.Module, i: int) -> None:
            (model(data[i % len(data)]).values() * probe).sum().backward()

        times: dict[str, list[float]] = {n: [] for n in models}
        for name, model in models.items():
            for i in range(args.warmup):
                step(model, i)
        for _ in range(args.rounds):
            for name, model in models.items():
                ts = []
                for i in range(args.iters):
                    t0 = time.perf_counter()
                    step(model, i)
                    ts.append(time.perf_counter() - t0)
                times[name].append(statistics.median(ts))
        names = list(models)
        base = statistics.median(times[names[0]])
        results = []
        for name in names:
            t = statistics.median(times[name])
            results.append({"case": name, "step_ms": t * 1e3, "vs_stock": t / base,
                            "per_round_ms": [round(x * 1e3, 1) for x in times[name]]})
            print(f"{name:38s} {t * 1e3:8.1f} ms   x{t / base:5.2f} of stock   (rounds {min(times[name]) * 1e3:.1f}.."
                  f"{max(times[name]) * 1e3:.1f} ms)", flush=True)
        info_end = os.getloadavg()
        print(f"load average at the end {[round(x, 2) for x in info_end]}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"machine": info, "load_end": info_end, "shape": asdict(shape), "results": results}, f, indent=1)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
