"""TorchRec's preprocessed Criteo layout, read in row ranges through ``np.load(mmap_mode="r")``.

A day is ``day_{i}_dense.npy`` (float32 [N, 13], already log-transformed by
``BinaryCriteoUtils.tsv_to_npys``), ``day_{i}_sparse.npy`` ([N, 26], int64 raw hashes, or
int32 after ``sparse_to_contiguous``) and ``day_{i}_labels.npy`` (int32 [N, 1]). A
source is one day (its prefix, ``.../day_0``) or a directory of days.

Memory-mapped, a rank touches only the rows it reads, so a 1TB day costs no memory up
front. Not through TorchRec's ``InMemoryBinaryCriteoIterDataPipe``, which stages all
columns in one float32 array (IDs above 2^24 lose their low bits). Here IDs stay int64:
``ids="raw"`` hashes them like the TSV reader (0 stays "missing", others 1 + id % (vocab
- 1)), so a day read from TSV or from its npy gives the same IDs; ``ids="contiguous"``
takes them as they are and checks they fit ``vocab_size``. Rows are checked as they are
read (labels 0/1, IDs in range): an error names the file and the row.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .criteo import CAT_NAMES, NUM_CAT, NUM_INT
from .format import Chunk, DataError, DatasetMeta, ROW_GROUP_ROWS


def npy_paths(prefix: str | Path) -> tuple[Path, Path, Path]:
    """``.../day_0`` -> its dense, sparse and labels files."""
    p = str(prefix)
    for suffix in ("_dense.npy", "_sparse.npy", "_labels.npy"):
        if p.endswith(suffix):
            p = p[: -len(suffix)]
    return Path(p + "_dense.npy"), Path(p + "_sparse.npy"), Path(p + "_labels.npy")


def day_prefixes(path: str | Path) -> list[Path]:
    """A prefix as given, or every ``*_dense.npy`` of a directory in day order (day_2 before day_10)."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    found = sorted(path.glob("*_dense.npy"), key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    if not found:
        raise DataError(f"{path}: no *_dense.npy files (TorchRec's npy layout has day_<i>_{{dense,sparse,labels}}.npy)")
    return [Path(str(p)[: -len("_dense.npy")]) for p in found]


def _open(path: Path, cols: int) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: missing (the npy layout has _dense, _sparse and _labels files per day)")
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception as e:
        raise DataError(f"{path}: not an npy file: {e}") from None
    if arr.ndim != 2 or arr.shape[1] != cols:
        raise DataError(f"{path}: expected shape [rows, {cols}], got {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise DataError(f"{path}: no rows")
    return arr


class NpySource:
    """Units are ``chunk_rows``-row ranges of each day, so ranks and the shuffle see the same
    granularity as a Parquet row group."""

    def __init__(self, path: str | Path, vocab_size: int, ids: str = "raw", chunk_rows: int = ROW_GROUP_ROWS) -> None:
        if ids not in ("raw", "contiguous"):
            raise ValueError(f"ids must be 'raw' or 'contiguous', got {ids!r}")
        self.path, self.vocab, self.ids = Path(path), vocab_size, ids
        self.days = []
        for prefix in day_prefixes(path):
            dp, sp, lp = npy_paths(prefix)
            d, s, lab = _open(dp, NUM_INT), _open(sp, NUM_CAT), _open(lp, 1)
            if not (len(d) == len(s) == len(lab)):
                raise DataError(f"{prefix}: row counts differ: dense {len(d)}, sparse {len(s)}, labels {len(lab)}")
            if not np.issubdtype(s.dtype, np.integer):
                raise DataError(f"{sp}: IDs must be integers, got dtype {s.dtype}")
            self.days.append((prefix, d, s, lab))
        self.units = [((i, lo), min(chunk_rows, len(day[1]) - lo))
                      for i, day in enumerate(self.days) for lo in range(0, len(day[1]), chunk_rows)]
        self.meta = DatasetMeta(CAT_NAMES, (vocab_size,) * NUM_CAT, NUM_INT, sum(n for _, n in self.units))

    def read(self, unit: tuple[int, int], start: int, stop: int) -> Chunk:
        day, lo = unit
        prefix, d, s, lab = self.days[day]
        a, b = lo + start, lo + stop
        labels = np.asarray(lab[a:b, 0])
        bad = (labels != 0) & (labels != 1)
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(f"{npy_paths(prefix)[2]}: row {a + i}: label must be 0 or 1, got {labels[i]}")
        sparse = np.asarray(s[a:b]).astype(np.int64)
        if self.ids == "raw":
            sparse = np.where(sparse == 0, 0, 1 + np.remainder(sparse, self.vocab - 1))
        else:
            off = (sparse < 0) | (sparse >= self.vocab)
            if off.any():
                r, c = (int(x) for x in np.argwhere(off)[0])
                raise DataError(f"{npy_paths(prefix)[1]}: row {a + r}, column {CAT_NAMES[c]}: ID {int(sparse[r, c])} "
                                f"outside [0, {self.vocab})")
        return Chunk(np.asarray(d[a:b], dtype=np.float32), sparse, labels.astype(np.float32))
