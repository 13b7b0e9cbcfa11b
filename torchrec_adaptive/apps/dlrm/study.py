"""Several configs trained one after another in the same ranks, then a table and a plot.

    torchrun --nproc_per_node 2 -m torchrec_adaptive.apps.dlrm.study \\
        --configs configs/synthetic/{adam,adamar,fal,meda}.yaml --out runs/study

This is the README's main job (through torchx, ``launch/components.py:study``). One
process group serves every run (no restart between methods); each run gets its own
directory ``<out>/<name>`` with metrics, diagnostics and checkpoints, and rank 0
finally prints the per-epoch test-AUC table (and per frequency bucket) and writes
``<out>/auc_by_epoch.png``. ``--resume`` skips runs already complete (same run, same
config), continues an interrupted one from its last valid checkpoint, and starts the
runs that have nothing to resume (saying so); a mistyped ``--out`` (no such folder)
fails instead. ``--set`` overrides apply to every run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from .config import RunConfig, load_config, to_dict
from .report import auc_table, bucket_table, plot_auc, read_metrics
from .runs import RunError, RunRecord, config_hash
from .train import add_run_flags, init_distributed, run


def _complete(out: Path, cfg: RunConfig) -> bool:
    """Every epoch's metrics are there, written by the run ``config.json`` names with this config."""
    m = out / "metrics.jsonl"
    try:
        record = RunRecord.read(out)
    except RunError:
        return False  # an older app's folder: run() says what to do with it
    if record is None or not m.exists():
        return False
    want = config_hash(to_dict(cfg))
    mine = [r for r in read_metrics(m) if r.get("run_id") == record.run_id and r.get("config_hash") == want]
    return len({r["epoch"] for r in mine}) >= cfg.train.epochs


@record
def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", required=True)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="runs/study")
    add_run_flags(ap, "skip complete runs, continue interrupted ones, start those with nothing to resume")
    args = ap.parse_args(argv)
    if args.allow_config_change and not args.resume:
        raise SystemExit("--allow-config-change only applies with --resume")
    if args.resume and not Path(args.out).is_dir():
        raise SystemExit(f"--resume: there is no study in {args.out!r} (no such folder); check --out, or run "
                         f"without --resume to start one")
    configs = [load_config(c, args.set) for c in args.configs]  # all validated before any training
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"two configs share a name (each run gets a directory by name): {names}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    init_distributed(args.device)
    out = Path(args.out)
    try:
        for cfg in configs:
            where = out / cfg.name
            if args.resume and _complete(where, cfg):
                if dist.get_rank() == 0:
                    print(f"[{cfg.name}] complete, skipped (--resume)", flush=True)
                continue
            run(cfg, where, resume=args.resume, allow_config_change=args.allow_config_change, missing_ok=True,
                device_kind=args.device)
        if dist.get_rank() == 0:
            runs = {c.name: read_metrics(out / c.name / "metrics.jsonl") for c in configs}
            table = auc_table(runs)
            buckets = bucket_table(runs)
            plot = out / "auc_by_epoch.png"
            plot_auc(runs, plot, title="DLRM on the synthetic long-tail click log, 2 ranks")
            text = (f"Test AUC per epoch\n\n{table}\n\nTest AUC per frequency bucket of the rarest ID "
                    f"(last epoch)\n\n{buckets}\n")
            (out / "summary.md").write_text(text)
            print("\n" + text + f"\nplot: {plot}\nsummary: {out / 'summary.md'}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
