"""Criteo click logs in their raw TSV layout: Kaggle's ``train.txt`` and the 1TB ``day_*``.

Each line: label, 13 integer features, 26 hashed categoricals (hex strings); empty
fields are missing. Gzipped files (``.gz``) are read directly.

Why not ``torchrec.datasets.criteo``: it reads no ``.gz``, and its npy pipeline stages
IDs in float32 when shuffling, so IDs above 2^24 are rounded. Here IDs stay integers
end to end: the hex value modulo (vocab - 1), plus 1 (0 is "missing").
"""

from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import IO, Sequence

import torch

from .dataset import ClickData, DataError

NUM_INT, NUM_CAT = 13, 26
CAT_NAMES = tuple(f"C{i}" for i in range(1, NUM_CAT + 1))


def _open(path: Path) -> IO[str]:
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path, "rt")  # noqa: SIM115


def read_criteo_tsv(path: str | Path, vocab_sizes: int | Sequence[int] = 100_000, max_rows: int | None = None) -> ClickData:
    """Reads a Criteo TSV; integer features become log(1 + max(x, 0)) as in DLRM."""
    path = Path(path)
    vocabs = (vocab_sizes,) * NUM_CAT if isinstance(vocab_sizes, int) else tuple(vocab_sizes)
    if len(vocabs) != NUM_CAT or min(vocabs) < 2:
        raise ValueError(f"Criteo has {NUM_CAT} categorical fields: give one vocab size >= 2 or {NUM_CAT} of them")
    labels, dense, sparse = [], [], []
    with _open(path) as f:
        for lineno, line in enumerate(f, start=1):
            if max_rows is not None and len(labels) >= max_rows:
                break
            cols = line.rstrip("\n").split("\t")
            if len(cols) != 1 + NUM_INT + NUM_CAT:
                raise DataError(f"{path}:{lineno}: expected {1 + NUM_INT + NUM_CAT} tab-separated columns, got {len(cols)}")
            if cols[0] not in ("0", "1"):
                raise DataError(f"{path}:{lineno}: column 1 (label) must be 0 or 1, got {cols[0]!r}")
            labels.append(float(cols[0]))
            row = []
            for j in range(NUM_INT):
                v = cols[1 + j]
                try:
                    row.append(math.log1p(max(int(v), 0)) if v else 0.0)
                except ValueError:
                    raise DataError(f"{path}:{lineno}: column {2 + j} (I{j + 1}) is not an integer: {v!r}") from None
            dense.append(row)
            cats = []
            for j, v in enumerate(cols[1 + NUM_INT :]):
                if not v:
                    cats.append(0)
                    continue
                try:
                    cats.append(1 + int(v, 16) % (vocabs[j] - 1))
                except ValueError:
                    raise DataError(f"{path}:{lineno}: column {2 + NUM_INT + j} ({CAT_NAMES[j]}) is not hex: {v!r}") from None
            sparse.append(cats)
    if not labels:
        raise DataError(f"{path}: no rows")
    return ClickData(torch.tensor(dense, dtype=torch.float32), torch.tensor(sparse, dtype=torch.int64),
                     torch.tensor(labels), CAT_NAMES, vocabs)
