"""The input pipeline at scale: memory per rank, its speed against the training step, and the converter.

    .venv/bin/python benchmarks/data_pipeline.py rss --rows 1000000 10000000 50000000 --data /tmp/dp
    .venv/bin/python benchmarks/data_pipeline.py speed --data /tmp/dp        # pipeline vs step, 2 ranks
    .venv/bin/python benchmarks/data_pipeline.py convert --rows 1000000 --data /tmp/dp
    .venv/bin/python benchmarks/data_pipeline.py epoch --rows 10000000 --batch 4096 --data /tmp/dp

``rss``: writes the synthetic set of ``configs/synthetic`` (20 fields, 4 dense) at each
size with the app's chunked generator (kept under ``--data`` for reuse), then streams
one epoch of rank 0 of 2 through the app's own input (``ClickSource.train_batches``:
rank-sharded plan, shuffle buffer, prefetch thread, TorchRec ``Batch`` per step) in a
fresh process per size, and reports that process's peak RSS (``ru_maxrss``) and rows/s.
Memory should stay flat as rows grow: a rank holds a row group, the shuffle buffer and
the queued batches, never its share.

``speed``: the same pipeline's rows/s per rank (alone, 1 thread) against the app's
training step on 2 gloo ranks (``train.run``, ``configs/synthetic/adamar.yaml``, its
``samples_per_s_per_rank`` over the training loop), on the 1M-row set, same process
layout as the app (``OMP_NUM_THREADS=1``).

``epoch``: one whole epoch of the app (``train.run`` on 2 gloo ranks, ``kind: parquet``
on the synthetic set of ``--rows`` rows, then evaluation), with each rank's peak RSS.

``convert``: rows/s of the converter (``convert_files``, Criteo TSV -> Parquet, hashing,
ID counts, writing) against pyarrow's own multi-threaded ``read_csv`` of the same file
(parsing only, types inferred), on a generated Criteo-shaped TSV with Zipf-distributed
8-digit hex IDs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _synthetic(rows: int):  # noqa: ANN202
    from torchrec_adaptive.apps.dlrm.config import load_config

    cfg = load_config(ROOT / "configs/synthetic/adamar.yaml", [f"data.synthetic.train_rows={rows}",
                                                               "data.synthetic.test_rows=10000"])
    return cfg


def _make(data: Path, rows: int) -> Path:
    from torchrec_adaptive.apps.dlrm.data import write_synthetic

    out = data / f"synthetic_{rows}"
    if not (out / "test" / "_dataset.json").exists():
        t = time.perf_counter()
        write_synthetic(_synthetic(rows).data.synthetic, out, progress=True)
        print(f"wrote {rows} rows in {time.perf_counter() - t:.0f} s", flush=True)
    return out


def stream_one_rank(root: Path, batch: int, world: int = 2) -> Dict[str, Any]:
    """One epoch of rank 0's share through the app's input; peak RSS of this process."""
    import torch

    torch.set_num_threads(1)
    import torchrec.datasets.utils  # noqa: F401  (imported by the app before training; not input time)
    import torchrec.sparse.jagged_tensor  # noqa: F401

    from torchrec_adaptive.apps.dlrm.config import DataConfig
    from torchrec_adaptive.apps.dlrm.inputs import open_data, steps_per_epoch

    cfg = DataConfig(kind="parquet", train=str(root / "train"), test=str(root / "test"))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = open_data(cfg)
    steps = steps_per_epoch(data.train_rows, batch, world)
    t = time.perf_counter()
    n = 0
    for b in data.train_batches(batch, epoch=1, seed=0, shuffle=True, rank=0, world=world, steps=steps,
                                shuffle_rows=cfg.shuffle_rows, prefetch=cfg.prefetch):
        n += int(b.labels.shape[0])
    secs = time.perf_counter() - t
    return {"rows": data.train_rows, "rank_rows": n, "seconds": secs, "rows_per_s": n / secs,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_data_mb": rss0 / 1024}


def _stream_subprocess(root: Path, batch: int) -> Dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "_stream", str(root), str(batch)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cmd_rss(args: argparse.Namespace) -> Dict[str, Any]:
    res = {}
    for rows in args.rows:
        root = _make(args.data, rows)
        r = _stream_subprocess(root, args.batch)
        print(f"{rows:>11,d} rows: rank 0 of 2 streamed {r['rank_rows']:,d} rows, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"({r['rss_before_data_mb']:.0f} MB before opening the data), {r['rows_per_s']:,.0f} rows/s", flush=True)
        res[str(rows)] = r
    return res


def _train_worker(rank: int, port: int, cfg_path: str, overrides: list, out: str, q: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    import torch
    import torch.distributed as dist

    from torchrec_adaptive.apps.dlrm.config import load_config
    from torchrec_adaptive.apps.dlrm.quiet import quiet_console
    from torchrec_adaptive.apps.dlrm.train import run

    quiet_console()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        (rec,) = run(load_config(cfg_path, overrides), Path(out))
        q.put((rank, rec["samples_per_s_per_rank"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, rec))
    finally:
        dist.destroy_process_group()


def cmd_speed(args: argparse.Namespace) -> Dict[str, Any]:
    import tempfile

    from benchmarks.ranks import run_ranks

    root = _make(args.data, 1_000_000)
    pipe = _stream_subprocess(root, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["data.kind=parquet", f"data.train={root / 'train'}", f"data.test={root / 'test'}",
                     "train.epochs=1", f"train.max_steps_per_epoch={args.steps}", "train.checkpoint=false",
                     "train.diagnostics=false", f"train.batch_size={args.batch}"]
        rep = run_ranks(_train_worker, str(ROOT / "configs/synthetic/adamar.yaml"), overrides, tmp)
    step = max(r[0] for r in rep.values())  # the faster rank: the bar the input must clear
    print(f"pipeline alone {pipe['rows_per_s']:,.0f} rows/s per rank; training step {step:,.0f} rows/s per rank "
          f"(2 ranks); ratio {pipe['rows_per_s'] / step:.1f}x", flush=True)
    return {"pipeline_rows_per_s": pipe["rows_per_s"], "step_rows_per_s": step, "ratio": pipe["rows_per_s"] / step}


def cmd_epoch(args: argparse.Namespace) -> Dict[str, Any]:
    """One full epoch of the app (train.run, 2 gloo ranks) on the synthetic Parquet set of --rows rows."""
    import tempfile

    from benchmarks.ranks import run_ranks

    root = _make(args.data, args.rows[0])
    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["data.kind=parquet", f"data.train={root / 'train'}", f"data.test={root / 'test'}",
                     "train.epochs=1", "train.checkpoint=false", "train.diagnostics=false",
                     f"train.batch_size={args.batch}"]
        t = time.perf_counter()
        rep = run_ranks(_train_worker, str(ROOT / "configs/synthetic/adamar.yaml"), overrides, tmp)
        wall = time.perf_counter() - t
    out = {str(r): {"samples_per_s": v[0], "peak_rss_mb": v[1]} for r, v in sorted(rep.items())}
    rec = rep[0][2]
    print(f"{args.rows[0]:,d} rows, 2 ranks, one epoch of {rec['steps']} steps x {args.batch} per rank in "
          f"{rec['train_seconds']:.0f} s (job {wall:.0f} s), test AUC {rec['test_auc']:.4f} on {rec['test_rows']} rows; "
          + "; ".join(f"rank {r}: peak RSS {v['peak_rss_mb']:.0f} MB, {v['samples_per_s']:,.0f} samples/s"
                      for r, v in out.items()), flush=True)
    return {"ranks": out, "steps": rec["steps"], "train_seconds": rec["train_seconds"], "test_auc": rec["test_auc"],
            "wall_seconds": wall}


def _criteo_tsv(path: Path, rows: int) -> None:
    """A Criteo-shaped TSV: label, 13 ints (some empty), 26 Zipf-distributed 8-digit hex IDs."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pcsv

    g = np.random.default_rng(0)
    hexd = np.frombuffer(b"0123456789abcdef", np.uint8)
    with pcsv.CSVWriter(str(path), schema=pa.schema([(f"c{i}", pa.string()) for i in range(40)]),
                        write_options=pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")) as w:
        for lo in range(0, rows, 100_000):
            n = min(100_000, rows - lo)
            cols = [pa.array(g.integers(0, 2, n).astype(str))]
            for _ in range(13):
                v = g.zipf(1.5, n).astype(str)
                v[g.random(n) < 0.2] = ""
                cols.append(pa.array(v))
            for _ in range(26):
                ids = (g.zipf(1.2, n) * 2654435761 % 2**32).astype(np.uint64)
                nib = (ids[:, None] >> np.arange(28, -1, -4, dtype=np.uint64)[None, :]) & np.uint64(15)
                cols.append(pa.array(hexd[nib.astype(np.int64)].view("S8")[:, 0]).cast(pa.string()))
            w.write_table(pa.table(cols, names=[f"c{i}" for i in range(40)]))


def cmd_convert(args: argparse.Namespace) -> Dict[str, Any]:
    import shutil

    import pyarrow.csv as pcsv

    from torchrec_adaptive.apps.dlrm.data.convert import convert_files

    rows = args.rows[0]
    args.data.mkdir(parents=True, exist_ok=True)
    tsv, small = args.data / f"criteo_{rows}.tsv", args.data / "criteo_small.tsv"
    if not tsv.exists():
        _criteo_tsv(tsv, rows)
        _criteo_tsv(small, 1000)
    t = time.perf_counter()
    n = pcsv.read_csv(str(tsv), read_options=pcsv.ReadOptions(column_names=[f"c{i}" for i in range(40)]),
                      parse_options=pcsv.ParseOptions(delimiter="\t")).num_rows
    raw = time.perf_counter() - t
    out = args.data / "converted"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    convert_files("criteo", [tsv], out, test_inputs=[small], vocab_size=1_000_000, progress=False)
    conv = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    mb = tsv.stat().st_size / 2**20
    print(f"{n:,d} rows ({mb:.0f} MB): pyarrow read_csv {n / raw:,.0f} rows/s, converter {n / conv:,.0f} rows/s "
          f"-> {raw / conv:.2f}x", flush=True)
    return {"rows": n, "mb": mb, "raw_rows_per_s": n / raw, "convert_rows_per_s": n / conv, "ratio": raw / conv}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_stream":
        print(json.dumps(stream_one_rank(Path(sys.argv[2]), int(sys.argv[3]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("rss", "speed", "convert", "epoch"))
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--data", type=Path, default=Path("/tmp/data_pipeline"))
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    res = {"rss": cmd_rss, "speed": cmd_speed, "convert": cmd_convert, "epoch": cmd_epoch}[args.what](args)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
