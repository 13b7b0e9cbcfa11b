"""One training step (forward + backward + fused update) of our kernel vs FBGEMM's
fused kernels, in the same process, on the same batches.

    .venv/bin/python benchmarks/kernel_step.py                # the issue's shape: 26 x 100k x 64, B=4096
    .venv/bin/python benchmarks/kernel_step.py --quick        # a small shape, for a smoke run
    .venv/bin/python benchmarks/kernel_step.py --json out.json
    .venv/bin/python benchmarks/kernel_step.py --device cuda  # on a GPU: also FBGEMM's fused ADAM; HBM floor
    .venv/bin/python benchmarks/kernel_step.py --floor-only --bandwidth-gbps 3350 4800  # on paper (H100, H200)
    TORCHREC_ADAPTIVE_CPU_ISA=avx2 .venv/bin/python benchmarks/kernel_step.py   # our AVX2 build, on an AVX-512 CPU

Prints the median step time of each, its ratio to FBGEMM's fused
EXACT_ROWWISE_ADAGRAD (the only fused adaptive optimizer FBGEMM runs on CPU;
on CUDA also to fused ADAM, the stock twin of our Adam/AdamAR), and the
memory-bandwidth floor: the bytes a step must touch divided by the bandwidth of a
large tensor copy measured on the device (on a GPU: its HBM). ``--floor-only`` times
nothing: it prints each case's bytes per step and the floor at the given bandwidths. The header
records the machine (benchmarks/machine.py): CPU, threads, the instruction set of
FBGEMM's kernels and of ours, and the load average at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
import machine  # noqa: E402

import torchrec_adaptive as tra
from torchrec_adaptive import AdaptiveTBE, TableSpec


@dataclass
class Shape:
    tables: int = 26
    rows: int = 100_000
    dim: int = 64
    batch: int = 4096
    zipf: float = 1.05


def make_batches(shape: Shape, pooling: int, count: int, device: torch.device, seed: int = 0):
    """Fixed pooling factor per bag (the issue's 1 and 8), Zipf IDs over a shuffled vocabulary."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, shape.rows + 1, dtype=torch.float64) ** shape.zipf
    perms = [torch.randperm(shape.rows, generator=g) for _ in range(shape.tables)]
    out = []
    for _ in range(count):
        n = shape.batch * pooling
        idx = torch.cat([perms[t][torch.multinomial(p, n, replacement=True, generator=g)] for t in range(shape.tables)])
        offsets = torch.arange(0, shape.tables * shape.batch + 1, dtype=torch.long) * pooling
        out.append((idx.to(device), offsets.to(device)))
    return out


def time_steps(module: torch.nn.Module, batches, warmup: int, iters: int, device: torch.device) -> float:
    # (out * probe).sum() hands backward a dense, contiguous output gradient, as the
    # MLP above the embeddings does in training (out.sum() would give an expanded one).
    probe: list[torch.Tensor] = []

    def step(i: int) -> None:
        idx, off = batches[i % len(batches)]
        out = module(idx, off)
        if not probe:
            probe.append(torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device))
        (out * probe[0]).sum().backward()

    for i in range(warmup):
        step(i)
    times = []
    for i in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step(warmup + i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mb: int = 512) -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    a = torch.empty(mb * 2**20 // 4, device=device).uniform_()
    b = torch.empty_like(a)
    for _ in range(2):
        b.copy_(a)
    times = []
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        b.copy_(a)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * 4 / min(times)


def bytes_touched(shape: Shape, batches, per_row_state_bytes: int, per_elem_state: int) -> float:
    """A lower bound of the bytes one step moves: each lookup reads its row in
    forward and its bag's gradient in backward; each unique row reads and writes
    its weights and optimizer state once."""
    idx, _ = batches[0]
    lookups = idx.numel()
    unique = sum(
        int(torch.unique(idx.view(shape.tables, -1)[t]).numel()) for t in range(shape.tables)
    )
    d4 = shape.dim * 4
    return lookups * 2 * d4 + unique * 2 * (d4 * (1 + per_elem_state) + per_row_state_bytes)


def fbgemm_module(shape: Shape, optimizer: str, device: torch.device) -> torch.nn.Module:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType, SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen

    loc, cdev = (EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if device.type == "cuda" else (EmbeddingLocation.HOST, ComputeDevice.CPU)
    return SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(shape.rows, shape.dim, loc, cdev) for _ in range(shape.tables)],
        optimizer=getattr(EmbOptimType, optimizer),
        learning_rate=0.01,
        eps=1e-8,
        pooling_mode=PoolingMode.SUM,
        weights_precision=SparseType.FP32,
        output_dtype=SparseType.FP32,
        device=device,
    )


def ours(shape: Shape, cls, kwargs, device: torch.device) -> torch.nn.Module:
    specs = [TableSpec(f"t{i}", shape.rows, shape.dim) for i in range(shape.tables)]
    # offsets are built by us and known-good; the check costs a host sync per step
    return AdaptiveTBE(specs, cls.rule_config(**kwargs), device=device, validate_offsets=False)


FBGEMM_ADAM = "fbgemm ADAM"


def measured_cases(shape: Shape, device: torch.device) -> list[tuple[str, Callable[[], torch.nn.Module], int, int]]:
    """(name, builder, optimizer-state bytes per row, optimizer-state floats per element) after FBGEMM's
    row-wise Adagrad, which is first: the ratios' base."""
    return [
        (FBGEMM_ADAM, lambda: fbgemm_module(shape, "ADAM", device), 0, 2),  # CUDA only (FBGEMM has no CPU Adam)
        ("ours RowWiseAdagrad", lambda: ours(shape, tra.RowWiseAdagrad, {"lr": 0.01}, device), 16, 0),
        ("ours Adam", lambda: ours(shape, tra.Adam, {"lr": 0.01}, device), 12, 2),
        ("ours AdamAR", lambda: ours(shape, tra.AdamAR, {"lr": 0.01, "alpha": 1e-3}, device), 12, 2),
        ("ours FAL+AdamAR", lambda: ours(shape, tra.AdamAR, {"lr": 0.01, "alpha": 1e-3, "fal_tau": 10.0}, device), 12, 2),
    ]


def floors(shape: Shape, poolings: list[int], gbps: list[float], out: str | None) -> int:
    """Bytes per step of every case (the batches are drawn on the CPU; nothing is timed) and the step
    time they mean at each bandwidth: the floor no kernel beats on that memory."""
    cpu = torch.device("cpu")
    cases = [("fbgemm EXACT_ROWWISE_ADAGRAD", None, 4, 0)] + measured_cases(shape, cpu)
    rows = []
    for pooling in poolings:
        batches = make_batches(shape, pooling, 1, cpu)
        for name, _, row_bytes, elem_states in cases:
            moved = bytes_touched(shape, batches, row_bytes, elem_states)
            rows.append({"pooling": pooling, "case": name, "bytes": moved,
                         "floor_ms": {f"{g:g}": moved / (g * 1e9) * 1e3 for g in gbps}})
            at = "  ".join(f"{moved / (g * 1e9) * 1e6:7.1f} us at {g:g} GB/s" for g in gbps)
            print(f"pooling {pooling}  {name:30s} {moved / 2**20:8.1f} MiB/step   {at}", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump({"shape": asdict(shape), "floors": rows}, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shape (smoke run)")
    ap.add_argument("--pooling", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--iters", type=int, default=5, help="timed steps per case per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per case per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--floor-only", action="store_true", help="time nothing: bytes per step and the floors")
    ap.add_argument("--bandwidth-gbps", type=float, nargs="+", default=[3350.0, 4800.0],
                    help="with --floor-only: bandwidths for the floor (default: H100 SXM and H200 HBM3/3e)")
    ap.add_argument("--json", help="write results here")
    args = machine.parse_cpu_args(ap, argv)  # --threads, --no-malloc-env
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device cuda: torch.cuda.is_available() is False (torch {torch.__version__})")
    device = torch.device(args.device)
    shape = Shape(tables=4, rows=20_000, dim=32, batch=512) if args.quick else Shape()
    if args.floor_only:
        return floors(shape, args.pooling, args.bandwidth_gbps, args.json)
    bw = copy_bandwidth(device)
    cases: list[tuple[str, Callable[[], torch.nn.Module], int, int]] = [
        ("fbgemm EXACT_ROWWISE_ADAGRAD", lambda: fbgemm_module(shape, "EXACT_ROWWISE_ADAGRAD", device), 4, 0),
    ]
    cases += [c for c in measured_cases(shape, device) if device.type == "cuda" or c[0] != FBGEMM_ADAM]
    info = machine.describe()
    print(machine.header(info))
    print(f"shape {asdict(shape)} device {device} threads {torch.get_num_threads()} copy bandwidth {bw / 1e9:.1f} GB/s")
    results = []
    for pooling in args.pooling:
        batches = make_batches(shape, pooling, 4, device)
        modules = [build() for _, build, _, _ in cases]
        # Round-robin: every round times each case in turn, so slow drifts of this
        # shared machine hit all cases alike; the ratios use per-case medians.
        times: list[list[float]] = [[] for _ in cases]
        for _ in range(args.rounds):
            for i, module in enumerate(modules):
                times[i].append(time_steps(module, batches, args.warmup, args.iters, device))
        del modules
        base = statistics.median(times[0])
        adam = statistics.median(times[1]) if cases[1][0] == FBGEMM_ADAM else None
        for (name, _, row_bytes, elem_states), ts in zip(cases, times):
            t = statistics.median(ts)
            moved = bytes_touched(shape, batches, row_bytes, elem_states)
            floor = moved / bw
            results.append({"pooling": pooling, "case": name, "step_ms": t * 1e3, "vs_fbgemm_rowwise_adagrad": t / base,
                            "floor_ms": floor * 1e3, "vs_floor": t / floor, "bytes": moved,
                            **({"vs_fbgemm_adam": t / adam} if adam else {})})
            vs_adam = f"  x{t / adam:5.2f} of FBGEMM Adam" if adam else ""
            print(f"pooling {pooling}  {name:30s} {t * 1e3:8.1f} ms   x{t / base:5.2f} of FBGEMM row-wise Adagrad"
                  f"{vs_adam}   floor {floor * 1e3:6.1f} ms (x{t / floor:4.1f})", flush=True)
    load_end = [round(x, 2) for x in os.getloadavg()]
    print(f"load average at the end {load_end}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "load_end": load_end, "shape": asdict(shape), "device": str(device),
                       "bandwidth_Bps": bw, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
