"""Train and evaluate one configured DLRM run on every rank of the default process group.

    torchrun --nproc_per_node 2 -m torchrec_adaptive.apps.dlrm.train --config configs/synthetic/adamar.yaml
    ... --set train.epochs=2 --set sparse_optimizer.kwargs.alpha=1e-3 --out runs/x --resume

Per epoch: ``start_epoch`` (FAL's epoch schedule, MEDA's re-init), training (tqdm on
rank 0), evaluation (AUC and log loss, overall and per frequency bucket), row
diagnostics, one JSON line in ``<out>/metrics.jsonl`` (rank 0) and a DCP checkpoint
``<out>/checkpoints/epoch_<e>`` (weights, fused and dense optimizer state, the epoch).
``--resume`` continues after the newest complete checkpoint; metrics of the epochs
it replays are not duplicated (lines after the checkpoint's epoch are dropped).

The loop is a plain loop by default. ``train.pipeline: sparse_dist`` uses TorchRec's
``TrainPipelineSparseDist`` (input dist of batch i+1 overlapped with batch i); on
2 CPU ranks over gloo it gave no speed-up (docs/performance.md), and Helen's two
passes per step need the plain loop.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from ...diagnostics import row_statistics, statistics_to_json
from ...epochs import start_epoch
from .config import RunConfig, load_config, to_dict
from .evaluate import Evaluator
from .inputs import open_data, steps_per_epoch
from .model import build_model, shard
from .optim import dense_optimizer

CHECKPOINTS = "checkpoints"


def _rank0() -> bool:
    return dist.get_rank() == 0


def _progress(it: Iterator[Any], total: int, desc: str) -> Iterator[Any]:
    import sys

    from tqdm import tqdm

    # Under torchx/torchrun stderr is a pipe and every refresh becomes a log line: refresh rarely there.
    interval = 1.0 if sys.stderr.isatty() else 15.0
    return iter(tqdm(it, total=total, desc=desc, disable=not _rank0(), leave=False, mininterval=interval,
                     dynamic_ncols=True))


def latest_checkpoint(out: Path) -> Optional[tuple[int, Path]]:
    """The newest complete checkpoint (DCP writes ``.metadata`` last, after every rank's shards)."""
    done = []
    for p in (out / CHECKPOINTS).glob("epoch_*"):
        if (p / ".metadata").exists() and p.name[6:].isdigit():
            done.append((int(p.name[6:]), p))
    return max(done) if done else None


def _extra(dense_opt: Any, epoch: int) -> dict[str, Any]:
    """What a checkpoint holds besides the model and its fused optimizer."""
    return {"dense_optim": dense_opt, "app": {"epoch": torch.tensor(epoch)}}


def save_checkpoint(out: Path, model: Any, dense_opt: Any, epoch: int) -> None:
    from ...distributed import checkpoint

    path = out / CHECKPOINTS / f"epoch_{epoch}"
    if _rank0() and path.exists():
        shutil.rmtree(path)  # a stale partial write from a run that died here
    dist.barrier()
    checkpoint.save(model, str(path), extra=_extra(dense_opt, epoch))


def load_checkpoint(path: Path, model: Any, dense_opt: Any) -> int:
    """Collective: checks the checkpoint against this model (clear error, nothing loaded), loads it."""
    from ...distributed import checkpoint

    dense_opt.init_state()  # DCP loads in place: the dense state must exist first (restored by load)
    state = checkpoint.load(model, str(path), extra=_extra(dense_opt, 0))
    return int(state["app"]["epoch"])


def _append_jsonl(path: Path, record_: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record_) + "\n")


def _truncate_metrics(path: Path, after_epoch: int) -> None:
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["epoch"] <= after_epoch]
        path.write_text("".join(ln + "\n" for ln in keep))


def run(cfg: RunConfig, out: Path, *, resume: bool = False, base_dir: str | Path = ".") -> list[dict[str, Any]]:
    """Trains ``cfg`` on every rank; returns the per-epoch metrics (every rank)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    t = cfg.train
    out.mkdir(parents=True, exist_ok=True)
    metrics_path, diag_path = out / "metrics.jsonl", out / "diagnostics.jsonl"

    torch.manual_seed(t.seed)
    data = open_data(cfg.data, base_dir, out.parent / ".data_cache")  # streamed; converted once if raw
    buckets = data.id_buckets(t.freq_buckets, rank, world)
    meta = data.meta
    model, _ = build_model(cfg, meta.field_names, meta.vocab_sizes, meta.num_dense, device)
    model = shard(model, cfg, device)
    dense_opt = dense_optimizer(model, cfg.dense_optimizer)
    helen = None
    if cfg.helen is not None:
        from ...helen import Helen

        helen = Helen(model, dense_opt, rho=cfg.helen.rho, xi=cfg.helen.xi)
    first = 1
    found = latest_checkpoint(out) if resume else None
    if found is not None:
        first = load_checkpoint(found[1], model, dense_opt) + 1
        if _rank0():
            _truncate_metrics(metrics_path, first - 1)
            _truncate_metrics(diag_path, first - 1)
            print(f"[{cfg.name}] resumed from {found[1]} (epoch {first - 1} done)", flush=True)
    elif _rank0():
        for p in (metrics_path, diag_path):
            p.unlink(missing_ok=True)
        (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=1))

    steps = steps_per_epoch(data.train_rows, t.batch_size, world, t.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(f"{data.train_rows} training rows give no full batch of {t.batch_size} per rank on {world} ranks")
    meda = cfg.meda
    history: list[dict[str, Any]] = []
    for epoch in range(first, t.epochs + 1):
        report = start_epoch(model, epoch, meda=meda)
        model.train()
        batches = data.train_batches(t.batch_size, epoch=epoch, seed=t.seed, shuffle=t.shuffle, rank=rank, world=world,
                                     steps=steps, shuffle_rows=cfg.data.shuffle_rows, prefetch=cfg.data.prefetch)
        loss_sum = torch.zeros((), dtype=torch.float64)
        dist.barrier()
        t0 = time.perf_counter()
        if t.pipeline == "sparse_dist":
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            # The pipeline rewrites the sharded modules' forward for its prefetched input dist;
            # a fresh one per epoch, detached afterwards, lets evaluation call the model directly.
            pipeline = TrainPipelineSparseDist(model, dense_opt, device)
            it = _progress(iter(batches), steps, f"{cfg.name} epoch {epoch}")
            for _ in range(steps):
                loss, _, _ = pipeline.progress(it)  # DLRMTrain's (loss, logits, labels); it steps dense_opt
                loss_sum += float(loss)
            pipeline.detach()
        else:
            for batch in _progress(batches, steps, f"{cfg.name} epoch {epoch}"):
                if helen is not None:
                    loss = helen.step(lambda: model(batch)[0])
                else:
                    dense_opt.zero_grad()
                    loss, _ = model(batch)
                    loss.backward()  # embedding rows are updated here, by their fused optimizer
                    dense_opt.step()
                loss_sum += float(loss.detach())
        dist.barrier()
        seconds = time.perf_counter() - t0
        dist.all_reduce(loss_sum)

        result = evaluate(model, data.eval_batches(buckets, t.eval_batch_size, rank=rank, world=world,
                                                   prefetch=cfg.data.prefetch), t.freq_buckets, device)
        record_ = {"run": cfg.name, "epoch": epoch, "train_loss": float(loss_sum) / (steps * world),
                   "test_auc": result.pop("auc"), "test_logloss": result.pop("logloss"),
                   "test_rows": result.pop("rows"), "test_ctr": result.pop("ctr"), "buckets": result.pop("buckets"),
                   "steps": steps, "train_seconds": seconds,
                   "samples_per_s_per_rank": steps * t.batch_size / seconds,
                   "reinit_rows": report.reinit_rows}
        history.append(record_)
        stats = statistics_to_json(row_statistics(model)) if t.diagnostics else None
        if _rank0():
            _append_jsonl(metrics_path, record_)
            if stats is not None:
                _append_jsonl(diag_path, {"run": cfg.name, "epoch": epoch, "tables": json.loads(stats)})
            print(f"[{cfg.name}] epoch {epoch}: train loss {record_['train_loss']:.4f}  test AUC "
                  f"{record_['test_auc']:.4f}  log loss {record_['test_logloss']:.4f}  "
                  f"({record_['samples_per_s_per_rank']:.0f} samples/s/rank)", flush=True)
        if t.checkpoint:
            save_checkpoint(out, model, dense_opt, epoch)
    del model, dense_opt, helen
    gc.collect()
    return history


@torch.no_grad()
def evaluate(model: Any, batches: Any, edges: list[int], device: torch.device) -> dict[str, Any]:
    """Collective: every rank scores its share of the test set (``batches``); the metrics gather all shares."""
    model.eval()
    ev = Evaluator(edges, device)
    for batch, bucket, valid in batches:
        _, (_, logits, labels) = model(batch.to(device))
        ev.update(logits, labels, bucket.to(device), valid.to(device))
    model.train()
    return ev.compute()


def init_distributed() -> None:
    from .quiet import quiet_console

    quiet_console()  # before TorchRec's planner and DMP run: a newcomer sees progress and results
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a YAML file under configs/")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. train.epochs=2 (repeatable)")
    ap.add_argument("--out", help="run directory (default runs/<config name>)")
    ap.add_argument("--resume", action="store_true", help="continue after the newest checkpoint in --out")
    return ap


@record
def main(argv: Optional[list[str]] = None) -> None:
    args = parser().parse_args(argv)
    cfg = load_config(args.config, args.set)  # before init: a bad config fails fast on every rank
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    init_distributed()
    try:
        run(cfg, Path(args.out or f"runs/{cfg.name}"), resume=args.resume)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
