"""Helen's two-pass step vs one plain step of its base rule (AdamAR), same model, same run.

    .venv/bin/python benchmarks/helen_step.py [--quick]

Model: the kernel_step shape (26 tables x 100k x 64, batch 4096, Zipf 1.05) under a
linear head trained by torch Adam; cases interleaved round-robin, medians compared.
Also printed: each case's minor page faults per step (first touches of memory the
allocator took back from the OS; their kernel time is part of the step time).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import kernel_step as ks  # noqa: E402
import machine  # noqa: E402

import torchrec_adaptive as tra  # noqa: E402
from torchrec_adaptive.helen import Helen  # noqa: E402


class Model(nn.Module):
    def __init__(self, shape: ks.Shape) -> None:
        super().__init__()
        self.emb = ks.ours(shape, tra.AdamAR, {"lr": 0.01, "alpha": 1e-3}, torch.device("cpu"))
        self.head = nn.Linear(shape.tables * shape.dim, 1)

    def forward(self, idx: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(idx, off)).squeeze(1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=4)
    args = machine.parse_cpu_args(ap)  # --threads, --no-malloc-env
    shape = ks.Shape(tables=4, rows=20_000, dim=32, batch=512) if args.quick else ks.Shape()
    batches = ks.make_batches(shape, 1, 4, torch.device("cpu"))
    y = torch.rand(shape.batch, generator=torch.Generator().manual_seed(0))
    loss_fn = nn.BCEWithLogitsLoss()
    base, sam = Model(shape), Model(shape)
    base_opt = torch.optim.Adam(base.head.parameters(), lr=1e-3)
    helen = Helen(sam, torch.optim.Adam(sam.head.parameters(), lr=1e-3), rho=0.01, xi=0.5)

    def plain(i: int) -> None:
        base_opt.zero_grad()
        loss_fn(base(*batches[i % 4]), y).backward()
        base_opt.step()

    def two_pass(i: int) -> None:
        helen.step(lambda: loss_fn(sam(*batches[i % 4]), y))

    times: dict[str, list[float]] = {"AdamAR step": [], "Helen(AdamAR) step": []}
    faults = dict.fromkeys(times, 0)
    for _ in range(args.rounds):
        for name, fn in (("AdamAR step", plain), ("Helen(AdamAR) step", two_pass)):
            fn(0)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for i in range(args.iters):
                fn(i + 1)
            times[name].append((time.perf_counter() - t0) / args.iters)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    print(machine.header(machine.describe()))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:22s} {v * 1e3:8.1f} ms   {faults[k] / (args.rounds * args.iters):7.0f} page faults/step")
    print(f"Helen / base: x{med['Helen(AdamAR) step'] / med['AdamAR step']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
