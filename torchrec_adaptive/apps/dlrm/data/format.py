"""The app's on-disk training format: a directory of Parquet files plus two small side files.

    <split>/part-00000.parquet ...   columns label (int8), dense_0.. (float32), sparse_0.. (int32 or int64)
    <split>/_dataset.json            field names, vocabulary sizes, dense width, rows (``DatasetMeta``)
    <split>/_counts.npz              per field, how often each ID occurs in this split (train splits)

One column per feature (not a list column) so that ``pyarrow.dataset`` reads a row
group straight into one contiguous numpy array per column. Side files start with
``_`` so ``pyarrow.dataset`` skips them. The converter (``convert.py``) and the
synthetic generator write it; ``stream.py`` reads it. Every writer goes through
:class:`SplitWriter`, so the layout is defined here once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

META, COUNTS = "_dataset.json", "_counts.npz"
FORMAT_VERSION = 2
ROW_GROUP_ROWS = 1 << 16  # 65536 rows: a rank holds one row group at a time (~17 MB for Criteo)


class DataError(ValueError):
    """Bad input data; the message names the file and, where it can, the row and column."""


@dataclass
class Chunk:
    """A block of rows in the app's layout (numpy, so pyarrow and torch share it without copies)."""

    dense: np.ndarray  # [n, num_dense] float32
    sparse: np.ndarray  # [n, num_fields] int64, IDs in [0, vocab)
    labels: np.ndarray  # [n] float32 in {0, 1}

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, idx: np.ndarray | slice) -> "Chunk":
        return Chunk(self.dense[idx], self.sparse[idx], self.labels[idx])

    @staticmethod
    def concat(chunks: Sequence["Chunk"]) -> "Chunk":
        if len(chunks) == 1:
            return chunks[0]
        return Chunk(np.concatenate([c.dense for c in chunks]), np.concatenate([c.sparse for c in chunks]),
                     np.concatenate([c.labels for c in chunks]))


@dataclass(frozen=True)
class DatasetMeta:
    field_names: tuple[str, ...]
    vocab_sizes: tuple[int, ...]
    num_dense: int
    rows: int = 0
    format: int = FORMAT_VERSION

    @property
    def id_type(self) -> str:
        return "int32" if max(self.vocab_sizes) <= 2**31 - 1 else "int64"

    def save(self, split: Path) -> None:
        (split / META).write_text(json.dumps(asdict(self), indent=1))

    @staticmethod
    def load(split: str | Path) -> "DatasetMeta":
        p = Path(split) / META
        if not p.exists():
            raise DataError(f"{split}: not a converted data directory (no {META}); make one with "
                            f"`python -m torchrec_adaptive.apps.dlrm.data.convert`")
        raw = json.loads(p.read_text())
        if raw.get("format") != FORMAT_VERSION:
            raise DataError(f"{p}: format {raw.get('format')} is not {FORMAT_VERSION}; convert the data again")
        return DatasetMeta(tuple(raw["field_names"]), tuple(raw["vocab_sizes"]), int(raw["num_dense"]),
                           int(raw["rows"]))


def column_names(meta: DatasetMeta) -> tuple[list[str], list[str]]:
    return [f"dense_{i}" for i in range(meta.num_dense)], [f"sparse_{i}" for i in range(len(meta.field_names))]


def arrow_schema(meta: DatasetMeta):  # noqa: ANN201 (pyarrow types)
    import pyarrow as pa

    dense, sparse = column_names(meta)
    ids = pa.int32() if meta.id_type == "int32" else pa.int64()
    return pa.schema([("label", pa.int8())] + [(c, pa.float32()) for c in dense] + [(c, ids) for c in sparse])


def to_table(chunk: Chunk, meta: DatasetMeta):  # noqa: ANN201
    import pyarrow as pa

    dense, sparse = column_names(meta)
    ids = np.int32 if meta.id_type == "int32" else np.int64
    cols = [pa.array(chunk.labels.astype(np.int8))]
    cols += [pa.array(np.ascontiguousarray(chunk.dense[:, i], dtype=np.float32)) for i in range(len(dense))]
    cols += [pa.array(np.ascontiguousarray(chunk.sparse[:, i]).astype(ids, copy=False)) for i in range(len(sparse))]
    return pa.Table.from_arrays(cols, schema=arrow_schema(meta))


def from_table(table, meta: DatasetMeta) -> Chunk:  # noqa: ANN001
    """A table of this layout (any row count) -> a Chunk; columns are copied into row-major arrays once."""
    dense, sparse = column_names(meta)
    n = table.num_rows
    d = np.empty((n, meta.num_dense), np.float32)
    s = np.empty((n, len(sparse)), np.int64)
    for i, c in enumerate(dense):
        d[:, i] = table.column(c).to_numpy()
    for i, c in enumerate(sparse):
        s[:, i] = table.column(c).to_numpy()
    return Chunk(d, s, table.column("label").to_numpy().astype(np.float32))


class IdCounts:
    """Per field, how often each ID occurs: what the frequency-bucket evaluation needs of the training split."""

    def __init__(self, vocab_sizes: Sequence[int]) -> None:
        self.counts = [np.zeros(v, np.int64) for v in vocab_sizes]

    def add(self, sparse: np.ndarray) -> None:
        for f, c in enumerate(self.counts):
            np.add.at(c, sparse[:, f], 1)  # O(rows), unlike a bincount over the whole vocabulary

    def merge(self, other: "IdCounts") -> None:
        for a, b in zip(self.counts, other.counts):
            a += b

    def save(self, path: Path) -> None:
        """Only the IDs that occur (hashed vocabularies are mostly empty), uncompressed: fast either way."""
        arrays = {}
        for i, c in enumerate(self.counts):
            ids = np.flatnonzero(c)
            arrays[f"ids{i}"], arrays[f"n{i}"] = ids, c[ids]
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, vocab=np.array([len(c) for c in self.counts]), **arrays)
        tmp.replace(path)

    @staticmethod
    def load(path: Path, vocab_sizes: Sequence[int]) -> "IdCounts":
        out = IdCounts(vocab_sizes)
        with np.load(path) as z:
            if z["vocab"].tolist() != list(vocab_sizes):
                raise DataError(f"{path}: counts for vocabularies {z['vocab'].tolist()}, the data has {list(vocab_sizes)}")
            for i, c in enumerate(out.counts):
                c[z[f"ids{i}"]] = z[f"n{i}"]
        return out


def id_buckets(counts: Sequence[np.ndarray], edges: Sequence[int]) -> list[np.ndarray]:
    """Per field, each ID's frequency bucket (uint8): one byte per ID instead of eight, and the
    bucket of a row's rarest ID is the minimum of its IDs' buckets (buckets grow with the count)."""
    e = np.asarray(list(edges), np.int64)
    return [np.searchsorted(e, c, side="right").astype(np.uint8) for c in counts]


class SplitWriter:
    """Writes one split directory: Parquet parts of ``ROW_GROUP_ROWS``-row groups, then its side files.

    A part is written under a temporary name and renamed when closed, so a part that exists
    is complete (the converter's per-input resumability relies on it)."""

    def __init__(self, split: Path, meta: DatasetMeta, *, counts: bool, row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.split, self.meta, self.row_group_rows = split, meta, row_group_rows
        self.counts = IdCounts(meta.vocab_sizes) if counts else None
        split.mkdir(parents=True, exist_ok=True)
        self._writer = None
        self._pending: list[Chunk] = []
        self._pending_rows = 0
        self.rows = 0

    def open_part(self, name: str) -> None:
        import pyarrow.parquet as pq

        self.close_part()
        self._final = self.split / f"{name}.parquet"
        self._tmp = self.split / f"_{name}.parquet.tmp"
        self._writer = pq.ParquetWriter(self._tmp, arrow_schema(self.meta), compression="zstd")

    def write(self, chunk: Chunk) -> None:
        assert self._writer is not None, "open_part first"
        if len(chunk) == 0:
            return
        if self.counts is not None:
            self.counts.add(chunk.sparse)
        self._pending.append(chunk)
        self._pending_rows += len(chunk)
        while self._pending_rows >= self.row_group_rows:
            self._flush(self.row_group_rows)

    def _flush(self, rows: int) -> None:
        whole = Chunk.concat(self._pending)
        head, rest = whole.take(slice(0, rows)), whole.take(slice(rows, None))
        self._writer.write_table(to_table(head, self.meta), row_group_size=rows)
        self.rows += len(head)
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)

    def close_part(self) -> None:
        if self._writer is None:
            return
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.close()
        self._writer = None
        self._tmp.replace(self._final)

    def finish(self, rows: int | None = None, counts: IdCounts | None = None) -> DatasetMeta:
        """Closes the last part and writes the side files (``rows``/``counts``: totals when parts were
        written by earlier, resumed runs)."""
        self.close_part()
        meta = DatasetMeta(self.meta.field_names, self.meta.vocab_sizes, self.meta.num_dense,
                           self.rows if rows is None else rows)
        c = counts or self.counts
        if c is not None:
            c.save(self.split / COUNTS)
        meta.save(self.split)
        return meta


def log1p_clipped(x: np.ndarray) -> np.ndarray:
    """DLRM's dense transform for count features: log(1 + max(x, 0))."""
    return np.log1p(np.maximum(x, 0)).astype(np.float32)


def check_finite(x: np.ndarray, where: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise DataError(f"{where}: row {int(r)}, dense column {int(c)} is not finite: {x[r, c]}")

