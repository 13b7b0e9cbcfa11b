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

The steps are those of :class:`TrainRecipe` (setup, then per epoch train, evaluate,
log, checkpoint). ``train.pipeline: auto`` (the default) trains with TorchRec's
``TrainPipelineSparseDist`` on CUDA (input dist of batch i+1 overlapped with batch i) and
with a plain loop on CPU, where it gave no speed-up on 2 ranks over gloo
(docs/performance.md); Helen's two passes per step need the plain loop. On CUDA the
process group is NCCL, one GPU per rank, and nothing a step touches leaves the GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.elastic.multiprocessing.errors import record

from ...diagnostics import row_statistics, statistics_to_json
from ...epochs import start_epoch
from .config import RunConfig, load_config, to_dict
from .evaluate import evaluate
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


def resolve_pipeline(cfg: RunConfig, device: torch.device) -> str:
    """``auto``: TorchRec's ``TrainPipelineSparseDist`` on CUDA (it overlaps the next batch's
    input all-to-all with this batch's compute on a side stream), the plain loop on CPU
    (nothing runs asynchronously there: no gain, docs/performance.md), for Helen (two passes
    per step) and for MLET (the pipeline's fx trace of the model fails on its tables)."""
    if cfg.train.pipeline != "auto":
        return cfg.train.pipeline
    plain_only = cfg.helen is not None or cfg.model.mlet is not None
    return "sparse_dist" if device.type == "cuda" and not plain_only else "plain"


@dataclass
class EpochTraining:
    """What one epoch's training leaves: the loss summed over every step of every rank, still
    on the device (read once, when the epoch's record is written), and its wall time."""

    loss_sum: Tensor
    seconds: float
    reinit_rows: dict[str, int]


class TrainRecipe:
    """One configured run on every rank, as the steps of a recipe (torchtune's recipe
    interface, one recipe for every method: the config says what differs).

    ``setup()`` agrees on the run folder, opens the data, builds and shards the model and
    its optimizers and resumes; then per epoch ``train_epoch``, ``evaluate``, ``log_epoch``
    and ``checkpoint``; ``run()`` does all of it. Every step is collective (all ranks).

    On CUDA everything a step touches stays on the rank's GPU: batches are pinned by the
    input thread and copied with ``non_blocking``, the running loss is summed on the device
    and read once per epoch, and every collective gets device tensors (NCCL takes no CPU
    tensor). ``tests/apps/test_device_placement.py`` runs the steps on a device that is not
    the CPU and fails on any CPU tensor reaching the model or a collective."""

    def __init__(self, cfg: RunConfig, out: Path, *, resume: bool = False, allow_config_change: bool = False,
                 missing_ok: bool = False, device_kind: str = "auto", base_dir: str | Path = ".") -> None:
        self.cfg, self.out, self.base_dir = cfg, Path(out), base_dir
        self.resume, self.allow_config_change, self.missing_ok = resume, allow_config_change, missing_ok
        self.device = select_device(device_kind)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.metrics_path, self.diag_path = self.out / "metrics.jsonl", self.out / "diagnostics.jsonl"
        self.plan: Optional[Plan] = None
        self.data: Any = None
        self.buckets: Any = None
        self.model: Any = None
        self.dense_opt: Any = None
        self.helen: Any = None
        self.steps = 0
        self.first_epoch = 1
        self.pipeline = resolve_pipeline(cfg, self.device)

    # --- setup -------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.plan = _agree_on_plan(self.out, cfg, self.resume, self.allow_config_change, self.missing_ok)
        for m in self.plan.messages:
            _say(cfg.name, m)
        torch.manual_seed(t.seed)
        self.setup_data()
        self.setup_model()
        if self.plan.candidates:
            self.first_epoch = self._resume() + 1

    def setup_data(self) -> None:
        """The data, streamed (converted once if raw), and the steps per epoch (equal on every rank)."""
        t = self.cfg.train
        self.data = open_data(self.cfg.data, self.base_dir, self.out.parent / ".data_cache")
        self.buckets = self.data.id_buckets(t.freq_buckets, self.rank, self.world)  # collective for npy data
        self.steps = steps_per_epoch(self.data.train_rows, t.batch_size, self.world, t.max_steps_per_epoch)
        if self.steps < 1:
            raise ValueError(f"{self.data.train_rows} training rows give no full batch of {t.batch_size} per rank "
                             f"on {self.world} ranks")

    def setup_model(self) -> None:
        """DLRM sharded by DMP with our planner, its dense optimizer and, if configured, Helen."""
        cfg, meta = self.cfg, self.data.meta
        model, _ = build_model(cfg, meta.field_names, meta.vocab_sizes, meta.num_dense, self.device, self.steps)
        self.model = shard(model, cfg, self.device)
        self.dense_opt = dense_optimizer(self.model, cfg.dense_optimizer)
        if cfg.helen is not None:
            from ...helen import Helen

            self.helen = Helen(self.model, self.dense_opt, rho=cfg.helen.rho, xi=cfg.helen.xi)

    def _resume(self) -> int:
        assert self.plan is not None
        plan, name = self.plan, self.cfg.name
        done = resume_from(plan, self.model, self.dense_opt, name)
        if _rank0():
            _truncate_metrics(self.metrics_path, done)
            _truncate_metrics(self.diag_path, done)
            record_resume(self.out, plan, done, to_dict(self.cfg))
            changed = f"; config changed: {sorted(plan.changes)}" if plan.changes else ""
            print(f"[{name}] resumed from {self.out / CHECKPOINTS}/epoch_{done} (epoch {done} done, "
                  f"run {plan.record.run_id}){changed}", flush=True)
        return done

    # --- one epoch -----------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> EpochTraining:
        cfg, t = self.cfg, self.cfg.train
        report = start_epoch(self.model, epoch, meda=cfg.meda)
        self.model.train()
        batches = self.data.train_batches(t.batch_size, epoch=epoch, seed=t.seed, shuffle=t.shuffle, rank=self.rank,
                                          world=self.world, steps=self.steps, shuffle_rows=cfg.data.shuffle_rows,
                                          prefetch=cfg.data.prefetch, device=self.device)
        # Summed on the device: reading a loss every step (float(loss)) would wait for the GPU each step.
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        dist.barrier()
        t0 = time.perf_counter()
        it = _progress(iter(batches), self.steps, f"{cfg.name} epoch {epoch}")
        if self.pipeline == "sparse_dist":
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            # The pipeline rewrites the sharded modules' forward for its prefetched input dist;
            # a fresh one per epoch, detached afterwards, lets evaluation call the model directly.
            # It copies each batch to the device itself (non_blocking, on its memcpy stream).
            pipeline = TrainPipelineSparseDist(self.model, self.dense_opt, self.device)
            for _ in range(self.steps):
                loss, _, _ = pipeline.progress(it)  # DLRMTrain's (loss, logits, labels); it steps dense_opt
                loss_sum += loss.detach()
            pipeline.detach()
        else:
            for batch in it:
                loss_sum += self.step(batch.to(self.device, non_blocking=True))
        _wait_for(self.device)
        dist.barrier()
        seconds = time.perf_counter() - t0
        dist.all_reduce(loss_sum)
        return EpochTraining(loss_sum, seconds, report.reinit_rows)

    def step(self, batch: Any) -> Tensor:
        """One training step of the plain loop on a batch already on the device; the loss, detached."""
        if self.helen is not None:
            return self.helen.step(lambda: self.model(batch)[0]).detach()
        self.dense_opt.zero_grad()
        loss, _ = self.model(batch)
        loss.backward()  # embedding rows are updated here, by their fused optimizer
        self.dense_opt.step()
        return loss.detach()

    def evaluate(self) -> dict[str, Any]:
        """Collective: test AUC and log loss, overall and per frequency bucket (plain numbers)."""
        t = self.cfg.train
        batches = self.data.eval_batches(self.buckets, t.eval_batch_size, rank=self.rank, world=self.world,
                                         prefetch=self.cfg.data.prefetch, device=self.device)
        return evaluate(self.model, batches, t.freq_buckets, self.device)

    def epoch_record(self, epoch: int, trained: EpochTraining, result: dict[str, Any]) -> dict[str, Any]:
        assert self.plan is not None
        t, steps = self.cfg.train, self.steps
        identity = {"run_id": self.plan.record.run_id, "config_hash": config_hash(to_dict(self.cfg))}
        return {"run": self.cfg.name, **identity, "epoch": epoch,
                "train_loss": float(trained.loss_sum) / (steps * self.world),  # the epoch's one read of the loss
                "test_auc": result.pop("auc"), "test_logloss": result.pop("logloss"),
                "test_rows": result.pop("rows"), "test_ctr": result.pop("ctr"), "buckets": result.pop("buckets"),
                "steps": steps, "train_seconds": trained.seconds,
                "samples_per_s_per_rank": steps * t.batch_size / trained.seconds,
                "reinit_rows": trained.reinit_rows,
                "device": str(self.device), "process_group": str(dist.get_backend()), "pipeline": self.pipeline}

    def log_epoch(self, record_: dict[str, Any]) -> None:
        """Collective (row diagnostics); rank 0 appends the metrics and diagnostics lines and prints."""
        stats = statistics_to_json(row_statistics(self.model)) if self.cfg.train.diagnostics else None
        if not _rank0():
            return
        _append_jsonl(self.metrics_path, record_)
        if stats is not None:
            _append_jsonl(self.diag_path, {"run": self.cfg.name, "epoch": record_["epoch"], "tables": json.loads(stats)})
        print(f"[{self.cfg.name}] epoch {record_['epoch']}: train loss {record_['train_loss']:.4f}  test AUC "
              f"{record_['test_auc']:.4f}  log loss {record_['test_logloss']:.4f}  "
              f"({record_['samples_per_s_per_rank']:.0f} samples/s/rank)", flush=True)

    def checkpoint(self, epoch: int) -> None:
        assert self.plan is not None
        if self.cfg.train.checkpoint:
            save_checkpoint(self.out, self.model, self.dense_opt, epoch, self.plan.record.run_id)

    # --- all of it -----------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Setup, then every epoch not yet done; returns the per-epoch records (every rank)."""
        self.setup()
        history = []
        try:
            for epoch in range(self.first_epoch, self.cfg.train.epochs + 1):
                trained = self.train_epoch(epoch)
                record_ = self.epoch_record(epoch, trained, self.evaluate())
                self.log_epoch(record_)
                self.checkpoint(epoch)
                history.append(record_)
        finally:
            self.cleanup()
        return history

    def cleanup(self) -> None:
        """Drops the model and optimizers (the study trains the next config in the same processes)."""
        self.model = self.dense_opt = self.helen = None
        gc.collect()


def run(cfg: RunConfig, out: Path, *, resume: bool = False, allow_config_change: bool = False,
        missing_ok: bool = False, device_kind: str = "auto", base_dir: str | Path = ".") -> list[dict[str, Any]]:
    """Trains ``cfg`` on every rank (:class:`TrainRecipe`); returns the per-epoch metrics (every rank).

    ``resume``: continue the run in ``out`` (same run id; see the module docstring);
    ``missing_ok``: with nothing to resume, start it instead of failing (the study)."""
    return TrainRecipe(cfg, out, resume=resume, allow_config_change=allow_config_change, missing_ok=missing_ok,
                       device_kind=device_kind, base_dir=base_dir).run()


def _wait_for(device: torch.device) -> None:
    """The epoch's time must include the GPU's work still queued (once per epoch)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
