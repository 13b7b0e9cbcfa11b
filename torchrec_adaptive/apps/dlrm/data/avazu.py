"""Avazu CTR logs (``train.csv``: header, ``id, click, hour (YYMMDDHH), ...``).

Every column but ``id``, ``click`` and ``hour`` is categorical; ``hour`` becomes two
categoricals (hour of day, weekday) and, since DLRM needs dense input, two dense
features (hour/23, weekday/6). Strings are hashed with CRC32 (stable across runs and
machines, unlike Python's ``hash``) to 1 + crc % (vocab - 1); 0 is "missing".
"""

from __future__ import annotations

import csv
import datetime
import gzip
import zlib
from pathlib import Path

import torch

from .dataset import ClickData, DataError

REQUIRED = ("id", "click", "hour")


def read_avazu(path: str | Path, vocab_size: int = 100_000, max_rows: int | None = None) -> ClickData:
    path = Path(path)
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:  # type: ignore[operator]
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DataError(f"{path}: empty file (no header)")
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing} in the header")
        click, hour = header.index("click"), header.index("hour")
        cat_cols = [i for i, c in enumerate(header) if c not in REQUIRED]
        names = tuple(header[i] for i in cat_cols) + ("hour_of_day", "weekday")
        labels, dense, sparse = [], [], []
        for lineno, row in enumerate(reader, start=2):
            if max_rows is not None and len(labels) >= max_rows:
                break
            if len(row) != len(header):
                raise DataError(f"{path}:{lineno}: expected {len(header)} columns, got {len(row)}")
            if row[click] not in ("0", "1"):
                raise DataError(f"{path}:{lineno}: column 'click' must be 0 or 1, got {row[click]!r}")
            try:
                h = row[hour]
                when = datetime.datetime.strptime(h, "%y%m%d%H")
            except ValueError:
                raise DataError(f"{path}:{lineno}: column 'hour' must be YYMMDDHH, got {row[hour]!r}") from None
            labels.append(float(row[click]))
            dense.append([when.hour / 23.0, when.weekday() / 6.0])
            ids = [1 + zlib.crc32(row[i].encode()) % (vocab_size - 1) if row[i] else 0 for i in cat_cols]
            sparse.append(ids + [1 + when.hour, 1 + when.weekday()])
    if not labels:
        raise DataError(f"{path}: no data rows")
    vocabs = (vocab_size,) * len(cat_cols) + (25, 8)
    return ClickData(torch.tensor(dense, dtype=torch.float32), torch.tensor(sparse, dtype=torch.int64),
                     torch.tensor(labels), names, vocabs)
