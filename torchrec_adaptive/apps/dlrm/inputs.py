"""From a data config to per-rank TorchRec batches, and the frequency buckets of the test set.

One code path for every kind of data: the app trains from the Parquet format of
``data/format.py`` (``kind: parquet``, a converted directory) or TorchRec's npy days
(``kind: criteo_npy``), streamed and sharded by ``data/stream.py``. The other kinds
(``synthetic``, ``criteo_tsv``, ``avazu``, ``tabular``) are converted to Parquet first,
once, by the converter's own code, into a cache directory keyed by the data config and
the input files' sizes and times (``data.cache_dir``, default ``<run dir>/../.data_cache``):
the built-in synthetic set of the README's study is generated once and shared by its
runs. On each node, local rank 0 converts; the other ranks wait at a barrier.

The frequency buckets of a test row need the training count of every ID: the
converter writes them beside the train split (``_counts.npz``); for npy days the ranks
count their shares of the training rows in one streaming pass and all-reduce them.
They are held as one byte per ID (the ID's bucket), not as counts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ...collectives import collective_device
from .config import DataConfig
from .data.criteo_npy import NpySource
from .data.format import COUNTS, FORMAT_VERSION, Chunk, DataError, DatasetMeta, IdCounts, id_buckets
from .data.stream import ParquetSource, Prefetch, Source, eval_chunks, to_batch, train_chunks, train_steps

steps_per_epoch = train_steps


@dataclass
class ClickSource:
    """A train and a test source of the same fields, and the train counts' bucket per ID."""

    train: Source
    test: Source
    counts: Optional[list[np.ndarray]]  # per field, training count per ID (None: count on first use)

    @property
    def meta(self) -> DatasetMeta:
        return self.train.meta

    @property
    def train_rows(self) -> int:
        return sum(n for _, n in self.train.units)

    def id_buckets(self, edges: Sequence[int], rank: int = 0, world: int = 1) -> list[np.ndarray]:
        """Collective when the counts are not on disk (npy): every rank counts its share."""
        counts = self.counts if self.counts is not None else _count_shares(self.train, rank, world)
        return id_buckets(counts, edges)

    def train_batches(self, batch_size: int, *, epoch: int, seed: int, shuffle: bool, rank: int, world: int,
                      steps: int, shuffle_rows: int, prefetch: int, device: Optional[torch.device] = None) -> Prefetch:
        """Batches in pinned memory when ``device`` is a GPU (see :func:`_pinned`)."""
        keys = self.meta.field_names
        return Prefetch(lambda: _pinned((to_batch(c, keys) for c in train_chunks(
            self.train, batch_size, epoch=epoch, seed=seed, shuffle=shuffle, rank=rank, world=world, steps=steps,
            shuffle_rows=shuffle_rows)), device), depth=prefetch)

    def eval_batches(self, buckets: list[np.ndarray], batch_size: int, *, rank: int, world: int,
                     prefetch: int, device: Optional[torch.device] = None) -> Prefetch:
        """(batch, bucket per row, valid per row), every test row once across ranks."""
        keys = self.meta.field_names

        def make() -> Iterator[tuple[Any, Tensor, Tensor]]:
            for chunk, n in eval_chunks(self.test, batch_size, rank=rank, world=world):
                valid = torch.zeros(len(chunk), dtype=torch.bool)
                valid[:n] = True
                yield to_batch(chunk, keys), torch.from_numpy(rarest_bucket(buckets, chunk.sparse)), valid

        return Prefetch(lambda: _pinned(make(), device), depth=prefetch)


def _pinned(items: Iterator[Any], device: Optional[torch.device]) -> Iterator[Any]:
    """For a GPU: each item (a ``Batch``, or a tuple of them and tensors) in page-locked memory,
    so that the copy to the GPU (``.to(device, non_blocking=True)``) is asynchronous. Runs in the
    input thread, off the training step, as ``DataLoader(pin_memory=True)``'s pinning thread does,
    which also first makes this rank's GPU the thread's current device (pinning on another GPU's
    context would start one on GPU 0 from every rank)."""
    if device is None or device.type != "cuda":
        yield from items
        return
    torch.cuda.set_device(device)
    for item in items:
        yield tuple(x.pin_memory() for x in item) if isinstance(item, tuple) else item.pin_memory()


def rarest_bucket(buckets: list[np.ndarray], sparse: np.ndarray) -> np.ndarray:
    """Per row: the bucket of its rarest ID (buckets grow with the count, so the minimum bucket)."""
    return np.stack([b[sparse[:, f]] for f, b in enumerate(buckets)], axis=1).min(axis=1).astype(np.int64)


def _count_shares(train: Source, rank: int, world: int) -> list[np.ndarray]:
    import torch.distributed as dist

    counts = IdCounts(train.meta.vocab_sizes)
    rows = [n for _, n in train.units]
    for u in range(rank, len(rows), world):
        counts.add(train.read(train.units[u][0], 0, rows[u]).sparse)
    out = []
    for c in counts.counts:
        if dist.is_initialized() and world > 1:
            t = torch.from_numpy(c).to(collective_device())  # NCCL reduces device tensors only
            dist.all_reduce(t)
            c = t.cpu().numpy()
        out.append(c)
    return out


# --- conversion cache for raw logs and the synthetic set -----------------------------------

def _inputs_identity(cfg: DataConfig, base_dir: Path) -> list[Any]:
    out = []
    for p in (cfg.train, cfg.test, cfg.schema):
        if p is None:
            out.append(None)
            continue
        q = base_dir / p
        st = q.stat() if q.exists() else None
        out.append([str(q.resolve()), st.st_size if st else None, st.st_mtime_ns if st else None])
        if cfg.schema is not None and p == cfg.schema and q.exists():
            out.append(q.read_text())
    return out


def cache_key(cfg: DataConfig, base_dir: Path) -> str:
    d = asdict(cfg)
    d.pop("cache_dir", None), d.pop("shuffle_rows", None), d.pop("prefetch", None)
    text = json.dumps([FORMAT_VERSION, d, _inputs_identity(cfg, base_dir)], sort_keys=True, default=str)
    return f"{cfg.kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _convert_into(cfg: DataConfig, base_dir: Path, target: Path) -> None:
    from .data.convert import convert_files
    from .data.synthetic import write_synthetic

    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    print(f"[data] converting {cfg.kind} data once into {target} (later runs reuse it)", flush=True)
    if cfg.kind == "synthetic":
        write_synthetic(cfg.synthetic, tmp)
    else:
        assert cfg.train is not None
        convert_files(cfg.kind, [base_dir / cfg.train], tmp, test_inputs=[base_dir / cfg.test] if cfg.test else [],
                      test_fraction=None if cfg.test else cfg.test_fraction, vocab_size=cfg.vocab_size,
                      schema=base_dir / cfg.schema if cfg.schema else None, max_rows=cfg.max_rows, progress=False)
    try:
        tmp.rename(target)
    except OSError:  # another node made it first (shared file system)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def open_data(cfg: DataConfig, base_dir: str | Path = ".", cache_root: str | Path = "runs/.data_cache") -> ClickSource:
    """Collective when a conversion is needed (every rank must call it)."""
    import torch.distributed as dist

    base_dir = Path(base_dir)
    if cfg.kind == "parquet":
        assert cfg.train is not None and cfg.test is not None
        train, test = ParquetSource(base_dir / cfg.train), ParquetSource(base_dir / cfg.test)
        counts_path = train.path / COUNTS
        if not counts_path.exists():
            raise DataError(f"{counts_path}: missing; the converter writes the training ID counts there")
        counts = IdCounts.load(counts_path, train.meta.vocab_sizes).counts
    elif cfg.kind == "criteo_npy":
        assert cfg.train is not None and cfg.test is not None
        train = NpySource(base_dir / cfg.train, cfg.vocab_size, cfg.npy_ids)
        test, counts = NpySource(base_dir / cfg.test, cfg.vocab_size, cfg.npy_ids), None
    else:
        root = Path(cfg.cache_dir or cache_root) / cache_key(cfg, base_dir)
        if not root.exists() and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            root.parent.mkdir(parents=True, exist_ok=True)
            _convert_into(cfg, base_dir, root)
        if dist.is_initialized():
            dist.barrier()
        train, test = ParquetSource(root / "train"), ParquetSource(root / "test")
        counts = IdCounts.load(root / "train" / COUNTS, train.meta.vocab_sizes).counts
    if test.meta.field_names != train.meta.field_names or test.meta.vocab_sizes != train.meta.vocab_sizes:
        raise DataError(f"{cfg.test}: fields {test.meta.field_names} / vocabularies differ from {cfg.train}'s")
    return ClickSource(train, test, counts)


def bucket_edges(edges: Sequence[int]) -> list[tuple[int, float]]:
    """[1, 10] -> [(0, 1), (1, 10), (10, inf)]: half-open count ranges."""
    lows = [0, *edges]
    return [(lo, hi) for lo, hi in zip(lows, [*edges, math.inf])]


__all__ = ["ClickSource", "Chunk", "bucket_edges", "open_data", "rarest_bucket", "steps_per_epoch", "to_batch"]
