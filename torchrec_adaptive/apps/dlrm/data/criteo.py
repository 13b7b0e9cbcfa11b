"""Criteo click logs in their raw TSV layout: Kaggle's ``train.txt`` and the 1TB ``day_*``.

Each line: label, 13 integer features, 26 hashed categoricals (hex strings); empty
fields are missing; blank lines are skipped. Gzipped files (``.gz``) are read directly.
Read with pyarrow's multi-threaded streaming CSV reader, a block at a time.

Why not ``torchrec.datasets.criteo``: it reads no ``.gz``, and its npy pipeline stages
IDs in float32 when shuffling, so IDs above 2^24 are rounded. Here IDs stay integers
end to end: the hex value modulo (vocab - 1), plus 1 (0 is "missing"); integer
features become log(1 + max(x, 0)) as in DLRM.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .csvblocks import csv_blocks, first_bad, label_values
from .format import Chunk, DataError, DatasetMeta, log1p_clipped
from .hashing import hashed_ids

NUM_INT, NUM_CAT = 13, 26
CAT_NAMES = tuple(f"C{i}" for i in range(1, NUM_CAT + 1))
_COLUMNS = ["label"] + [f"I{i}" for i in range(1, NUM_INT + 1)] + list(CAT_NAMES)


def criteo_meta(vocab_sizes: int | Sequence[int]) -> DatasetMeta:
    vocabs = (vocab_sizes,) * NUM_CAT if isinstance(vocab_sizes, int) else tuple(vocab_sizes)
    if len(vocabs) != NUM_CAT or min(vocabs) < 2:
        raise ValueError(f"Criteo has {NUM_CAT} categorical fields: give one vocab size >= 2 or {NUM_CAT} of them")
    return DatasetMeta(CAT_NAMES, vocabs, NUM_INT)


def criteo_tsv_chunks(path: str | Path, meta: DatasetMeta) -> Iterator[Chunk]:
    """The file as Chunks of one CSV block each; errors name the file, the data row (from 1) and the column."""
    import pyarrow as pa
    import pyarrow.compute as pc

    path = Path(path)
    rows = 0
    for block in csv_blocks(path, column_names=_COLUMNS, delimiter="\t"):
        n = block.num_rows
        where = lambda i: f"{path}: row {rows + i + 1}"  # noqa: E731
        labels, i = label_values(block.column("label"), ("0", "1"))
        if i is not None:
            raise DataError(f"{where(i)}: column 1 (label) must be 0 or 1, got {block.column('label')[i].as_py()!r}")
        dense = np.zeros((n, NUM_INT), np.float32)
        for j in range(NUM_INT):
            col = block.column(f"I{j + 1}")
            try:
                v = pc.cast(pc.if_else(pc.equal(col, ""), "0", col), "int64").to_numpy(zero_copy_only=False)
            except pa.ArrowInvalid:  # Arrow does not say which row: find it
                i = first_bad(pc.invert(pc.match_substring_regex(col, r"^(-?[0-9]+)?$")))
                raise DataError(f"{where(i)}: column {2 + j} (I{j + 1}) is not an integer: {col[i].as_py()!r}") from None
            dense[:, j] = log1p_clipped(v)
        sparse = np.zeros((n, NUM_CAT), np.int64)
        for j, name in enumerate(CAT_NAMES):
            ids, bad = hashed_ids(block.column(name), meta.vocab_sizes[j], "hex")
            if bad is not None:
                raise DataError(f"{where(bad)}: column {2 + NUM_INT + j} ({name}) is not hex: "
                                f"{block.column(name)[bad].as_py()!r}")
            sparse[:, j] = ids
        rows += n
        yield Chunk(dense, sparse, labels)
    if rows == 0:
        raise DataError(f"{path}: no rows")

