"""TorchRec's preprocessed Criteo layout: ``day_{i}_dense.npy`` (float32 [N, 13], already
log-transformed by ``BinaryCriteoUtils.tsv_to_npys``), ``day_{i}_sparse.npy`` ([N, 26],
int64 raw hashes, or int32 after ``sparse_to_contiguous``) and ``day_{i}_labels.npy``
(int32 [N, 1]).

Rows come through ``BinaryCriteoUtils.load_npy_range`` (the library's reader, any
range of rows without loading the file), but not through its shuffling
``InMemoryBinaryCriteoIterDataPipe`` path, which stages all columns in one float32
array, so IDs above 2^24 lose their low bits. Here IDs stay int64: ``ids="raw"``
hashes them like the TSV reader (0 stays "missing", others 1 + id % (vocab - 1)), so
a day read from TSV or from its npy gives the same IDs; ``ids="contiguous"`` takes
them as they are and checks they fit ``vocab_size``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .criteo import CAT_NAMES, NUM_CAT, NUM_INT
from .dataset import ClickData, DataError


def npy_paths(prefix: str | Path) -> tuple[Path, Path, Path]:
    """``.../day_0`` -> its dense, sparse and labels files."""
    p = str(prefix)
    for suffix in ("_dense.npy", "_sparse.npy", "_labels.npy"):
        if p.endswith(suffix):
            p = p[: -len(suffix)]
    return Path(p + "_dense.npy"), Path(p + "_sparse.npy"), Path(p + "_labels.npy")


def _load(path: Path, cols: int, max_rows: int | None) -> np.ndarray:
    from torchrec.datasets.criteo import BinaryCriteoUtils

    if not path.exists():
        raise DataError(f"{path}: missing (the npy layout has _dense, _sparse and _labels files per day)")
    try:
        shape = BinaryCriteoUtils.get_shape_from_npy(str(path))
    except Exception as e:
        raise DataError(f"{path}: not an npy file: {e}") from None
    if len(shape) != 2 or shape[1] != cols:
        raise DataError(f"{path}: expected shape [rows, {cols}], got {list(shape)}")
    if shape[0] == 0:
        raise DataError(f"{path}: no rows")
    rows = shape[0] if max_rows is None else min(shape[0], max_rows)
    return BinaryCriteoUtils.load_npy_range(str(path), 0, rows)


def read_criteo_npy(prefix: str | Path, vocab_size: int = 100_000, ids: str = "raw",
                    max_rows: int | None = None) -> ClickData:
    if ids not in ("raw", "contiguous"):
        raise ValueError(f"ids must be 'raw' or 'contiguous', got {ids!r}")
    dense_p, sparse_p, labels_p = npy_paths(prefix)
    dense = _load(dense_p, NUM_INT, max_rows)
    sparse = _load(sparse_p, NUM_CAT, max_rows)
    labels = _load(labels_p, 1, max_rows)
    if not (len(dense) == len(sparse) == len(labels)):
        raise DataError(f"{prefix}: row counts differ: dense {len(dense)}, sparse {len(sparse)}, labels {len(labels)}")
    if not np.issubdtype(sparse.dtype, np.integer):
        raise DataError(f"{sparse_p}: IDs must be integers, got dtype {sparse.dtype}")
    bad = ~np.isin(labels[:, 0], (0, 1))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{labels_p}: row {i}: label must be 0 or 1, got {labels[i, 0]}")
    s = torch.from_numpy(sparse.astype(np.int64, copy=False))
    if ids == "raw":
        s = torch.where(s == 0, 0, 1 + torch.remainder(s, vocab_size - 1))
    else:
        off = (s < 0) | (s >= vocab_size)
        if bool(off.any()):
            r, c = (int(x) for x in off.nonzero()[0])
            raise DataError(f"{sparse_p}: row {r}, column {CAT_NAMES[c]}: ID {int(s[r, c])} outside [0, {vocab_size})")
    return ClickData(torch.from_numpy(dense.astype(np.float32)), s, torch.from_numpy(labels[:, 0].astype(np.float32)),
                     CAT_NAMES, (vocab_size,) * NUM_CAT)
