"""Streaming, rank-sharded reading of a converted data set (Parquet) or TorchRec's npy days.

A source is a list of *units* (a Parquet row group, or a row range of an npy day) with
their row counts, known from metadata without reading data. For an epoch:

1. Every rank permutes the units with the same seed (seed, epoch) and lays their rows
   end to end. Rank r takes rows ``[r * P, (r + 1) * P)`` of that sequence, with
   ``P = rows // world``, and reads only the units (or parts of units) that overlap it:
   every rank gets exactly P rows, so every rank takes the same number of steps,
   ``P // batch``. The tail (``rows % world`` rows, then fewer than one batch per
   rank) is not trained on in that epoch; with shuffling it is different rows each epoch.
2. Rows pass through a shuffle buffer seeded by (seed, epoch, rank): the rank reads
   units until ``shuffle_rows`` rows are buffered, permutes them, and emits full
   batches; the rows left over (less than a batch) stay for the next fill.
3. A background thread does all of it (reading, shuffling, building the TorchRec
   ``Batch``) into a bounded queue, so input is ready while the step runs.

Memory per rank is one unit plus the shuffle buffer plus the queued batches, however
many rows the data set has. Evaluation reads rows in storage order, rank r rows
``[r * N // world, (r + 1) * N // world)``: every test row exactly once, and the same
batch count on every rank (a rank that runs out gets one-row dummy batches marked invalid).
"""

from __future__ import annotations

import math
import queue
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import numpy as np
import torch

from .format import Chunk, DataError, DatasetMeta, arrow_schema, from_table


class Source(Protocol):
    meta: DatasetMeta
    units: list[tuple[Any, int]]  # (key, rows), in storage order

    def read(self, unit: Any, start: int, stop: int) -> Chunk: ...


class ParquetSource:
    """A converted split directory, read a row group at a time with ``pyarrow.dataset``."""

    def __init__(self, split: str | Path) -> None:
        import pyarrow.dataset as ds

        self.path = Path(split)
        self.meta = DatasetMeta.load(self.path)
        data = ds.dataset(str(self.path), format="parquet")  # skips _dataset.json, _counts.npz and _*.tmp
        want = arrow_schema(self.meta)
        if not data.schema.equals(want):
            raise DataError(f"{split}: Parquet schema {data.schema} is not the one {self.meta} describes")
        frags = sorted(data.get_fragments(), key=lambda f: f.path)
        self.units = [(rg, rg.row_groups[0].num_rows) for f in frags for rg in f.split_by_row_group()]
        rows = sum(n for _, n in self.units)
        if rows != self.meta.rows:
            raise DataError(f"{split}: the Parquet files hold {rows} rows, its {'_dataset.json'} says {self.meta.rows}: "
                            f"a part is missing or was added; convert again")
        self._columns = arrow_schema(self.meta).names

    def read(self, unit: Any, start: int, stop: int) -> Chunk:
        table = unit.to_table(columns=self._columns)
        return from_table(table.slice(start, stop - start), self.meta)


def _plan(rows: Sequence[int], order: Sequence[int], lo: int, hi: int) -> list[tuple[int, int, int]]:
    """(unit, start, stop) pieces covering rows [lo, hi) of the units laid end to end in ``order``."""
    out, off = [], 0
    for u in order:
        n = rows[u]
        a, b = max(lo, off), min(hi, off + n)
        if a < b:
            out.append((u, a - off, b - off))
        off += n
        if off >= hi:
            break
    return out


def train_steps(rows: int, batch_size: int, world: int, cap: Optional[int] = None) -> int:
    n = (rows // world) // batch_size
    return n if cap is None else min(n, cap)


def train_chunks(source: Source, batch_size: int, *, epoch: int, seed: int, shuffle: bool, rank: int, world: int,
                 steps: int, shuffle_rows: int) -> Iterator[Chunk]:
    """This rank's ``steps`` batches of an epoch (see the module docstring)."""
    rows = [n for _, n in source.units]
    per_rank = sum(rows) // world
    order = np.random.default_rng([seed, epoch]).permutation(len(rows)) if shuffle else np.arange(len(rows))
    pieces = _plan(rows, order, rank * per_rank, rank * per_rank + steps * batch_size)
    rng = np.random.default_rng([seed, epoch, rank, 1])
    buf: list[Chunk] = []
    held = emitted = 0
    for i, (u, a, b) in enumerate(pieces):
        buf.append(source.read(source.units[u][0], a, b))
        held += b - a
        if held < shuffle_rows and i < len(pieces) - 1:
            continue
        whole = Chunk.concat(buf)
        if shuffle:
            whole = whole.take(rng.permutation(len(whole)))
        full = (len(whole) // batch_size) * batch_size
        for s in range(0, full, batch_size):
            if emitted == steps:
                return
            yield whole.take(slice(s, s + batch_size))
            emitted += 1
        rest = whole.take(slice(full, None))
        buf, held = ([rest], len(rest)) if len(rest) else ([], 0)


def eval_chunks(source: Source, batch_size: int, *, rank: int, world: int) -> Iterator[tuple[Chunk, int]]:
    """(chunk, valid rows) over this rank's contiguous share, padded to the same count on every rank."""
    rows = [n for _, n in source.units]
    total = sum(rows)
    lo, hi = rank * total // world, (rank + 1) * total // world
    batches = math.ceil(math.ceil(total / world) / batch_size)
    buf: list[Chunk] = []
    held = done = 0
    for u, a, b in _plan(rows, range(len(rows)), lo, hi):
        buf.append(source.read(source.units[u][0], a, b))
        held += b - a
        while held >= batch_size:
            whole = Chunk.concat(buf)
            yield whole.take(slice(0, batch_size)), batch_size
            done += 1
            rest = whole.take(slice(batch_size, None))
            buf, held = [rest], len(rest)
    if held:
        yield Chunk.concat(buf), held
        done += 1
    while done < batches:  # a sharded forward is a collective: every rank runs as many batches
        yield Chunk(np.zeros((1, source.meta.num_dense), np.float32), np.zeros((1, len(source.meta.field_names)),
                                                                                 np.int64), np.zeros(1, np.float32)), 0
        done += 1


def to_batch(chunk: Chunk, keys: Sequence[str]) -> Any:
    """One-hot fields -> TorchRec ``Batch`` (KJT values are key-major: field 0 for every row, then field 1...)."""
    from torchrec.datasets.utils import Batch
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    b, f = chunk.sparse.shape
    values = torch.from_numpy(np.ascontiguousarray(chunk.sparse.T).reshape(-1))
    kjt = KeyedJaggedTensor(keys=list(keys), values=values, lengths=torch.ones(b * f, dtype=torch.int32))
    return Batch(dense_features=torch.from_numpy(chunk.dense), sparse_features=kjt,
                 labels=torch.from_numpy(chunk.labels))


_END = object()


class Prefetch:
    """Runs an iterator in a background thread, ``depth`` items ahead, into a bounded queue.

    A thread, not ``DataLoader`` workers: reading is pyarrow/numpy work that releases the GIL,
    and a thread shares the rank's memory (no second copy of the ID buckets, nothing
    pickled per batch). An exception in the thread is raised by ``next`` in the caller."""

    def __init__(self, make: Callable[[], Iterator[Any]], depth: int = 4) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True, name="dlrm-input")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable[[], Iterator[Any]]) -> None:
        try:
            for item in make():
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(e)

    def __iter__(self) -> "Prefetch":
        return self

    def __next__(self) -> Any:
        item = self._q.get()
        if item is _END:
            self._thread.join()
            raise StopIteration
        if isinstance(item, BaseException):
            self._thread.join()
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
