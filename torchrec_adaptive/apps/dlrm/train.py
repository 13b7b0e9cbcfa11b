"""Train and evaluate one configured DLRM run on every rank of the default process group.

    torchrun --nproc_per_node 2 -m torchrec_adaptive.apps.dlrm.train --config configs/synthetic/adamar.yaml
    ... --set train.epochs=2 --set sparse_optimizer.kwargs.alpha=1e-3 --out runs/x --resume

Per epoch: ``start_epoch`` (FAL's epoch schedule, MEDA's re-init), training (tqdm on
rank 0), evaluation (AUC and log loss, overall and per frequency bucket), row
diagnostics, one JSON line in ``<out>/metrics.jsonl`` (rank 0) and a DCP checkpoint
``<out>/checkpoints/epoch_<e>`` (weights, fused and dense optimizer state, the epoch).

Runs never mix (``runs.py``): ``config.json`` names the run (run id, config hash,
history); a fresh run moves an earlier run's files aside; ``--resume`` continues the
same run only, after its newest checkpoint that verifies (a damaged one is reported
and the previous one used), refuses a changed config unless ``--allow-config-change``,
and fails when there is nothing to resume. Metrics of the epochs it replays are not
duplicated (lines after the checkpoint's epoch are dropped). Checkpoint saves are
atomic (``distributed/checkpoint.py``): a kill at any moment leaves the earlier
checkpoints loadable.

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
from .runs import CHECKPOINTS, Plan, RunError, config_hash, plan_run, record_resume


def _rank0() -> bool:
    return dist.get_rank() == 0


def _progress(it: Iterator[Any], total: int, desc: str) -> Iterator[Any]:
    import sys

    from tqdm import tqdm

    # Under torchx/torchrun stderr is a pipe and every refresh becomes a log line: refresh rarely there.
    interval = 1.0 if sys.stderr.isatty() else 15.0
    return iter(tqdm(it, total=total, desc=desc, disable=not _rank0(), leave=False, mininterval=interval,
                     dynamic_ncols=True))


def _extra(dense_opt: Any, epoch: int) -> dict[str, Any]:
    """What a checkpoint holds besides the model and its fused optimizer."""
    return {"dense_optim": dense_opt, "app": {"epoch": torch.tensor(epoch)}}


def save_checkpoint(out: Path, model: Any, dense_opt: Any, epoch: int, run_id: str) -> None:
    """Atomic: the folder appears complete (with its manifest) or not at all."""
    from ...distributed import checkpoint

    checkpoint.save(model, str(out / CHECKPOINTS / f"epoch_{epoch}"), extra=_extra(dense_opt, epoch),
                    info={"run_id": run_id, "epoch": epoch})


def load_checkpoint(path: Path, model: Any, dense_opt: Any) -> int:
    """Collective: verifies the files and checks the checkpoint against this model (clear error,
    nothing loaded), loads it."""
    from ...distributed import checkpoint

    dense_opt.init_state()  # DCP loads in place: the dense state must exist first (restored by load)
    state = checkpoint.load(model, str(path), extra=_extra(dense_opt, 0))
    return int(state["app"]["epoch"])


def _say(name: str, text: str) -> None:
    if _rank0():
        print(f"[{name}] {text}", flush=True)


def _agree_on_plan(out: Path, cfg: RunConfig, resume: bool, allow_config_change: bool, missing_ok: bool) -> Plan:
    """Collective: rank 0 reads (and for a fresh run, moves aside) the folder; every rank gets its
    decision, or raises its error."""
    box: list[Any] = [None]
    if _rank0():
        try:
            box[0] = plan_run(out, to_dict(cfg), resume=resume, allow_config_change=allow_config_change,
                              missing_ok=missing_ok)
        except Exception as e:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
            box[0] = e if isinstance(e, RunError) else RunError(f"{out}: {type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], RunError):
        raise RunError(str(box[0]))
    return box[0]


def resume_from(plan: Plan, model: Any, dense_opt: Any, name: str) -> int:
    """Collective: loads the newest of ``plan.candidates`` that verifies; a damaged one is reported
    and the next older one tried. Returns the epoch loaded."""
    from ...distributed.checkpoint import CheckpointDamaged

    damaged = []
    for _, path in plan.candidates:
        try:
            epoch = load_checkpoint(path, model, dense_opt)
        except CheckpointDamaged as e:  # every rank raises it (the problems are gathered): all move on
            damaged.append(str(e))
            _say(name, f"WARNING: {e}\n  -> falling back to the previous checkpoint")
            continue
        if damaged:
            _say(name, f"fell back to {path} (epoch {epoch}), the newest complete and valid checkpoint")
        return epoch
    raise RunError(f"nothing to resume: none of the {len(plan.candidates)} checkpoints of run {plan.record.run_id} "
                   f"is complete and valid:\n" + "\n".join(damaged))


def _append_jsonl(path: Path, record_: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record_) + "\n")


def _truncate_metrics(path: Path, after_epoch: int) -> None:
    if path.exists():
        keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["epoch"] <= after_epoch]
        path.write_text("".join(ln + "\n" for ln in keep))


def run(cfg: RunConfig, out: Path, *, resume: bool = False, allow_config_change: bool = False,
        missing_ok: bool = False, device_kind: str = "auto", base_dir: str | Path = ".") -> list[dict[str, Any]]:
    """Trains ``cfg`` on every rank; returns the per-epoch metrics (every rank).

    ``resume``: continue the run in ``out`` (same run id; see the module docstring);
    ``missing_ok``: with nothing to resume, start it instead of failing (the study)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = select_device(device_kind)
    t = cfg.train
    metrics_path, diag_path = out / "metrics.jsonl", out / "diagnostics.jsonl"
    plan = _agree_on_plan(out, cfg, resume, allow_config_change, missing_ok)
    for m in plan.messages:
        _say(cfg.name, m)
    identity = {"run_id": plan.record.run_id, "config_hash": config_hash(to_dict(cfg))}  # in every metrics line

    torch.manual_seed(t.seed)
    data = open_data(cfg.data, base_dir, out.parent / ".data_cache")  # streamed; converted once if raw
    buckets = data.id_buckets(t.freq_buckets, rank, world)
    meta = data.meta
    steps = steps_per_epoch(data.train_rows, t.batch_size, world, t.max_steps_per_epoch)
    if steps < 1:
        raise ValueError(f"{data.train_rows} training rows give no full batch of {t.batch_size} per rank on {world} ranks")
    model, _ = build_model(cfg, meta.field_names, meta.vocab_sizes, meta.num_dense, device, steps)
    model = shard(model, cfg, device)
    dense_opt = dense_optimizer(model, cfg.dense_optimizer)
    helen = None
    if cfg.helen is not None:
        from ...helen import Helen

        helen = Helen(model, dense_opt, rho=cfg.helen.rho, xi=cfg.helen.xi)
    first = 1
    if plan.candidates:
        first = resume_from(plan, model, dense_opt, cfg.name) + 1
        if _rank0():
            _truncate_metrics(metrics_path, first - 1)
            _truncate_metrics(diag_path, first - 1)
            record_resume(out, plan, first - 1, to_dict(cfg))
            changed = f"; config changed: {sorted(plan.changes)}" if plan.changes else ""
            print(f"[{cfg.name}] resumed from {out / CHECKPOINTS}/epoch_{first - 1} (epoch {first - 1} done, "
                  f"run {plan.record.run_id}){changed}", flush=True)

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
        record_ = {"run": cfg.name, **identity, "epoch": epoch, "train_loss": float(loss_sum) / (steps * world),
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
            save_checkpoint(out, model, dense_opt, epoch, plan.record.run_id)
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


def select_device(kind: str = "auto") -> torch.device:
    """``auto``: this rank's GPU if there is one, else the CPU; ``cuda`` (torchx ``--gpu N``) fails
    without a GPU instead of training on the CPU unnoticed; ``cpu``: the CPU."""
    if kind not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {kind!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "GPUs were asked for (--device cuda; the torchx components pass it for --gpu N > 0), but "
            f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build: {torch.version.cuda}; "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}). Use --gpu 0 to train on the CPU.")
    if kind == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def init_distributed(device_kind: str = "auto") -> None:
    from .quiet import quiet_console

    quiet_console()  # before TorchRec's planner and DMP run: a newcomer sees progress and results
    if dist.is_initialized():
        return
    cuda = select_device(device_kind).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")


def add_run_flags(ap: argparse.ArgumentParser, resume_help: str) -> None:
    """The flags train and study share. Plain flags: ``--resume`` takes no value (``--resume yes``
    is an error, not False)."""
    ap.add_argument("--resume", action="store_true", help=resume_help)
    ap.add_argument("--allow-config-change", action="store_true",
                    help="with --resume: go on with a changed config (recorded in config.json's history)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: a GPU per rank if there is one; cuda: fail without one (torchx --gpu N)")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="a YAML file under configs/")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. train.epochs=2 (repeatable)")
    ap.add_argument("--out", help="run directory (default runs/<config name>)")
    add_run_flags(ap, "continue the run in --out after its newest valid checkpoint (fails if there is none)")
    return ap


@record
def main(argv: Optional[list[str]] = None) -> None:
    args = parser().parse_args(argv)
    if args.allow_config_change and not args.resume:
        raise SystemExit("--allow-config-change only applies with --resume")
    cfg = load_config(args.config, args.set)  # before init: a bad config fails fast on every rank
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    init_distributed(args.device)
    try:
        run(cfg, Path(args.out or f"runs/{cfg.name}"), resume=args.resume,
            allow_config_change=args.allow_config_change, device_kind=args.device)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
