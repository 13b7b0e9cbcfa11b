"""Avazu CTR logs (``train.csv``: header, ``id, click, hour (YYMMDDHH), ...``).

Every column but ``id``, ``click`` and ``hour`` is categorical; ``hour`` becomes two
categoricals (hour of day, weekday) and, since DLRM needs dense input, two dense
features (hour/23, weekday/6). Strings are hashed with CRC32 (stable across runs and
machines, unlike Python's ``hash``) to 1 + crc % (vocab - 1); 0 is "missing".
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from .csvblocks import csv_blocks, first_bad, header, label_values
from .format import Chunk, DataError, DatasetMeta
from .hashing import hashed_ids

REQUIRED = ("id", "click", "hour")


def avazu_meta(path: str | Path, vocab_size: int) -> DatasetMeta:
    """The fields of this file (its header decides the categorical columns)."""
    path = Path(path)
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    cols = header(path, ",")
    missing = [c for c in REQUIRED if c not in cols]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} in the header")
    cats = tuple(c for c in cols if c not in REQUIRED)
    return DatasetMeta(cats + ("hour_of_day", "weekday"), (vocab_size,) * len(cats) + (25, 8), 2)


def avazu_chunks(path: str | Path, meta: DatasetMeta) -> Iterator[Chunk]:
    import pyarrow.compute as pc

    path = Path(path)
    cats = meta.field_names[:-2]
    rows = 0
    for block in csv_blocks(path):
        n = block.num_rows
        where = lambda i: f"{path}: row {rows + i + 1}"  # noqa: E731
        labels, bad = label_values(block.column("click"), ("0", "1"))
        if bad is not None:
            raise DataError(f"{where(bad)}: column 'click' must be 0 or 1, got {block.column('click')[bad].as_py()!r}")
        hour = block.column("hour")
        when = pc.strptime(hour, format="%y%m%d%H", unit="s", error_is_null=True)
        ok = pc.and_(pc.is_valid(when), pc.equal(pc.utf8_length(hour), 8))
        if not pc.all(ok).as_py():
            i = first_bad(pc.invert(ok))
            raise DataError(f"{where(i)}: column 'hour' must be YYMMDDHH, got {hour[i].as_py()!r}")
        h = pc.hour(when).to_numpy(zero_copy_only=False).astype(np.int64)
        wd = pc.day_of_week(when).to_numpy(zero_copy_only=False).astype(np.int64)  # Monday = 0, as datetime's
        sparse = np.zeros((n, len(meta.field_names)), np.int64)
        for j, c in enumerate(cats):
            sparse[:, j] = hashed_ids(block.column(c), meta.vocab_sizes[j], "crc32")[0]
        sparse[:, -2], sparse[:, -1] = 1 + h, 1 + wd
        dense = np.stack([h / 23.0, wd / 6.0], axis=1).astype(np.float32)
        rows += n
        yield Chunk(dense, sparse, labels)
    if rows == 0:
        raise DataError(f"{path}: no data rows")
