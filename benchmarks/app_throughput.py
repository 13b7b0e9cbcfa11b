"""Training throughput of the DLRM app (samples/s per rank) on 2 gloo ranks: stock fused
row-wise Adagrad (FBGEMM) vs our AdamAR, and AdamAR under TorchRec's TrainPipelineSparseDist.

    .venv/bin/python benchmarks/app_throughput.py                 # synthetic data of configs/synthetic
    .venv/bin/python benchmarks/app_throughput.py --steps 30 --rounds 3 --json out.json

Each case is the app's own ``train.run`` (data, DLRM, planner, DMP, training loop,
evaluation) on ``configs/synthetic/<case>.yaml`` with ``--steps`` steps per epoch, one
epoch, no checkpoints or diagnostics; its ``samples_per_s_per_rank`` covers the
training loop only (between barriers). Cases run round-robin in the same two
processes, so this VM's drift hits all alike; the report is the median over rounds
and its ratio to stock. On CUDA the stock case should be ``stock_adam`` (FBGEMM's
fused Adam); pass ``--stock stock_adam`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

from torchrec_adaptive.kernels.host_memory import MALLOC_ENV

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2


def _cases(stock: str) -> Dict[str, List[str]]:
    return {
        f"stock {stock} (FBGEMM fused)": ["configs/synthetic/stock_rowwise_adagrad.yaml", f"sparse_optimizer.name={stock}"],
        "ours AdamAR": ["configs/synthetic/adamar.yaml"],
        "ours AdamAR, TrainPipelineSparseDist": ["configs/synthetic/adamar.yaml", "train.pipeline=sparse_dist"],
    }


def _worker(rank: int, port: int, args: Dict[str, Any], q: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    import torch
    import torch.distributed as dist

    from torchrec_adaptive.apps.dlrm.config import load_config
    from torchrec_adaptive.apps.dlrm.train import run

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        common = ["train.epochs=1", f"train.max_steps_per_epoch={args['steps']}", "train.checkpoint=false",
                  "train.diagnostics=false", "data.synthetic.test_rows=8192"]
        cases = {name: load_config(ROOT / c[0], c[1:] + common) for name, c in _cases(args["stock"]).items()}
        rates: Dict[str, List[float]] = {name: [] for name in cases}
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(args["rounds"]):
                for name, cfg in cases.items():
                    (rec,) = run(cfg, Path(tmp) / cfg.name)
                    rates[name].append(rec["samples_per_s_per_rank"])
        q.put((rank, rates))
    finally:
        dist.destroy_process_group()


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="training steps per case per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--stock", default="stock_rowwise_adagrad", choices=["stock_rowwise_adagrad", "stock_adam"])
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    from ranks import run_ranks  # benchmarks/ranks.py (this script's directory is on sys.path)

    os.environ.update(MALLOC_ENV)  # read by glibc when the workers start
    reports = {r: rep[0] for r, rep in run_ranks(_worker, {"steps": args.steps, "rounds": args.rounds,
                                                            "stock": args.stock}, world=WORLD).items()}
    names = list(reports[0])
    # each rank's rate covers the same barrier-to-barrier interval: they agree; take rank 0's
    med = {n: statistics.median(reports[0][n]) for n in names}
    stock = med[names[0]]
    import machine  # benchmarks/machine.py

    print(machine.header(machine.describe()))
    print(f"\nDLRM app, configs/synthetic, 2 gloo ranks, {args.steps} steps x {args.rounds} rounds (median)")
    print("| case | samples/s per rank | ratio to stock | per round |")
    print("| --- | --- | --- | --- |")
    for n in names:
        print(f"| {n} | {med[n]:.0f} | {med[n] / stock:.2f} | {', '.join(f'{x:.0f}' for x in reports[0][n])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"median": med, "rounds": reports[0], "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
