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

``--seeds 0 1 2`` trains every config once per seed (``train.seed``: the initial values and
the shuffling; the data set stays the same), seed by seed, into ``<out>/seed_<s>/<name>``, and
the table and plot give mean ± std over the seeds, the plot with bands (``report.py``). The
seeds share one data cache, ``<out>/.data_cache``, unless ``data.cache_dir`` is set.
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
from .report import plot_bands, read_metrics, read_study, summary
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
    ap.add_argument("--seeds", nargs="+", type=int, metavar="SEED",
                    help="train every config once per seed (train.seed) into <out>/seed_<s>/<name>; report "
                         "mean ± std over the seeds")
    add_run_flags(ap, "skip complete runs, continue interrupted ones, start those with nothing to resume")
    args = ap.parse_args(argv)
    if args.allow_config_change and not args.resume:
        raise SystemExit("--allow-config-change only applies with --resume")
    if args.resume and not Path(args.out).is_dir():
        raise SystemExit(f"--resume: there is no study in {args.out!r} (no such folder); check --out, or run "
                         f"without --resume to start one")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"--seeds: each seed once, got {args.seeds}")
    out = Path(args.out)
    # (folder of the run's seed, configs); without --seeds one folder, the config's own seed
    plan: list[tuple[Path, list[RunConfig]]] = []
    for seed in args.seeds if args.seeds is not None else [None]:
        extra = [] if seed is None else [f"train.seed={seed}"]
        configs = [load_config(c, extra + args.set) for c in args.configs]  # all validated before any training
        if seed is not None and all(c.data.cache_dir is None for c in configs):
            configs = [load_config(c, extra + [f"data.cache_dir={out / '.data_cache'}"] + args.set)
                       for c in args.configs]  # one cache for every seed's folder
        plan.append((out if seed is None else out / f"seed_{seed}", configs))
    names = [c.name for c in plan[0][1]]
    if len(set(names)) != len(names):
        raise ValueError(f"two configs share a name (each run gets a directory by name): {names}")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    init_distributed(args.device)
    try:
        for folder, configs in plan:
            for cfg in configs:
                where = folder / cfg.name
                if args.resume and _complete(where, cfg):
                    if dist.get_rank() == 0:
                        print(f"[{cfg.name}] complete, skipped (--resume){'' if folder == out else f' ({folder.name})'}",
                              flush=True)
                    continue
                run(cfg, where, resume=args.resume, allow_config_change=args.allow_config_change, missing_ok=True,
                    device_kind=args.device)
        if dist.get_rank() == 0:
            runs = read_study(out, names)
            plot = out / "auc_by_epoch.png"
            seeds = "" if args.seeds is None else f", mean ± std over seeds {args.seeds}"
            plot_bands(runs, plot, title=f"DLRM on the synthetic long-tail click log, 2 ranks{seeds}")
            text = summary(runs)
            (out / "summary.md").write_text(text)
            print("\n" + text + f"\nplot: {plot}\nsummary: {out / 'summary.md'}", flush=True)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
