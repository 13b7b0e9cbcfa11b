"""From a data config to per-rank TorchRec batches, and the frequency buckets of the test set.

Every rank reads the whole data set (the built-in synthetic set is regenerated from
its seed; the file readers hold the samples and modest files this app targets) and
trains on its share, rows ``i`` with ``i % world == rank`` of each epoch's permutation.
All ranks take the same number of steps (``(rows // world) // batch``): a sharded
forward is a collective, so a rank with one batch more would wait forever.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .config import DataConfig
from .data import ClickData, DataError, make_synthetic, read_avazu, read_criteo_tsv
from .data.criteo_npy import read_criteo_npy
from .data.tabular import read_schema, read_tabular


def _read(cfg: DataConfig, path: str) -> ClickData:
    if cfg.kind == "criteo_tsv":
        return read_criteo_tsv(path, vocab_sizes=cfg.vocab_size, max_rows=cfg.max_rows)
    if cfg.kind == "criteo_npy":
        return read_criteo_npy(path, vocab_size=cfg.vocab_size, ids=cfg.npy_ids, max_rows=cfg.max_rows)
    if cfg.kind == "avazu":
        return read_avazu(path, vocab_size=cfg.vocab_size, max_rows=cfg.max_rows)
    if cfg.kind == "tabular":
        assert cfg.schema is not None
        return read_tabular(path, read_schema(cfg.schema), vocab_size=cfg.vocab_size, max_rows=cfg.max_rows)
    raise DataError(f"unknown data kind {cfg.kind!r}")


def subset(data: ClickData, idx: Tensor) -> ClickData:
    return ClickData(data.dense[idx], data.sparse[idx], data.labels[idx], data.field_names, data.vocab_sizes)


def load_data(cfg: DataConfig, base_dir: str | Path = ".") -> tuple[ClickData, ClickData]:
    """(train, test). Files are relative to ``base_dir``; without ``test`` the last
    ``test_fraction`` of ``train`` (in file order: click logs are time-ordered) is held out."""
    if cfg.kind == "synthetic":
        return make_synthetic(cfg.synthetic)
    assert cfg.train is not None
    resolve = lambda p: str(Path(base_dir) / p)  # noqa: E731
    train = _read(cfg, resolve(cfg.train))
    if cfg.test is not None:
        test = _read(cfg, resolve(cfg.test))
        if test.field_names != train.field_names:
            raise DataError(f"{cfg.test}: fields {test.field_names} differ from {cfg.train}'s {train.field_names}")
        return train, test
    n = len(train)
    cut = n - max(1, int(round(n * cfg.test_fraction)))
    if cut < 1:
        raise DataError(f"{cfg.train}: {n} rows are too few to hold out a test set")
    return subset(train, torch.arange(cut)), subset(train, torch.arange(cut, n))


def to_batch(dense: Tensor, sparse: Tensor, labels: Tensor, keys: Sequence[str]) -> Any:
    """One-hot fields -> TorchRec ``Batch`` (KJT values are key-major: field 0 for every row, then field 1...)."""
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    b, f = sparse.shape
    kjt = KeyedJaggedTensor(keys=list(keys), values=sparse.t().reshape(-1).contiguous(),
                            lengths=torch.ones(b * f, dtype=torch.int32))
    return Batch(dense_features=dense, sparse_features=kjt, labels=labels)


def steps_per_epoch(rows: int, batch_size: int, world: int, cap: int | None = None) -> int:
    n = (rows // world) // batch_size
    return n if cap is None else min(n, cap)


def train_batches(data: ClickData, batch_size: int, *, epoch: int, seed: int, shuffle: bool, rank: int, world: int,
                  steps: int) -> Iterator[Any]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    idx = torch.randperm(len(data), generator=gen) if shuffle else torch.arange(len(data))
    mine = idx[rank::world]
    for s in range(steps):
        sel = mine[s * batch_size:(s + 1) * batch_size]
        yield to_batch(data.dense[sel], data.sparse[sel], data.labels[sel], data.field_names)


def eval_batches(data: ClickData, extra: Tensor, batch_size: int, *, rank: int, world: int
                 ) -> Iterator[tuple[Any, Tensor, Tensor]]:
    """(batch, extra[rows], valid) over this rank's share of every row, the same number of batches on
    every rank; a rank whose share ran out gets a one-row dummy batch with ``valid`` False."""
    mine = torch.arange(len(data))[rank::world]
    per_rank = math.ceil(len(data) / world)
    for s in range(math.ceil(per_rank / batch_size)):
        sel = mine[s * batch_size:(s + 1) * batch_size]
        valid = torch.ones(sel.numel(), dtype=torch.bool)
        if sel.numel() == 0:
            sel, valid = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.bool)
        yield to_batch(data.dense[sel], data.sparse[sel], data.labels[sel], data.field_names), extra[sel], valid


def train_counts(train: ClickData) -> list[Tensor]:
    """Per field, how often each ID occurs in the training set."""
    return [torch.bincount(train.sparse[:, f], minlength=v) for f, v in enumerate(train.vocab_sizes)]


def rarest_id_count(counts: list[Tensor], data: ClickData) -> Tensor:
    """Per row: the training count of its rarest ID (the ID the model knows least)."""
    per_field = torch.stack([counts[f][data.sparse[:, f]] for f in range(len(counts))], dim=1)
    return per_field.min(dim=1).values


def bucket_edges(edges: Sequence[int]) -> list[tuple[int, float]]:
    """[1, 10] -> [(0, 1), (1, 10), (10, inf)]: half-open count ranges."""
    lows = [0, *edges]
    return [(lo, hi) for lo, hi in zip(lows, [*edges, math.inf])]


def bucket_index(rarest: Tensor, edges: Sequence[int]) -> Tensor:
    return torch.bucketize(rarest, torch.tensor(list(edges), dtype=rarest.dtype), right=True)
