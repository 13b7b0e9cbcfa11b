"""Streaming, multi-threaded CSV/TSV reading through pyarrow, every column as text.

Every column is read as a string so that a value's identity is its text (``"12"`` and
``"12.0"`` are different IDs, as they always were) and so that a bad value is found by
the reader that knows what the column means, with its row and column in the error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .format import DataError

BLOCK_BYTES = 1 << 24  # 16 MB of text per block: ~40k Criteo rows


def csv_blocks(path: Path, *, column_names: Optional[Sequence[str]] = None, delimiter: str = ",",
               include: Optional[Sequence[str]] = None, block_bytes: int = BLOCK_BYTES) -> Iterator:
    """pyarrow Tables of one block each. ``column_names``: the file has no header (Criteo);
    otherwise its header names the columns. Blank lines (a trailing newline or two) are skipped."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    if not path.exists():
        raise DataError(f"data file not found: {path}")
    names = list(column_names) if column_names is not None else header(path, delimiter)
    read = pcsv.ReadOptions(column_names=column_names, block_size=block_bytes, use_threads=True)
    parse = pcsv.ParseOptions(delimiter=delimiter, ignore_empty_lines=True)
    conv = pcsv.ConvertOptions(column_types={c: pa.string() for c in names}, strings_can_be_null=False,
                               include_columns=list(include) if include is not None else None)

    def blocks() -> Iterator:
        try:
            reader = pcsv.open_csv(pa.input_stream(str(path), compression="detect"), read_options=read,
                                   parse_options=parse, convert_options=conv)
            for batch in reader:
                yield pa.Table.from_batches([batch])
        except (pa.ArrowInvalid, pa.ArrowKeyError) as e:  # e.g. a row with the wrong number of columns
            if "Empty CSV file" in str(e):
                return  # the caller says "no rows" in its terms
            raise DataError(f"{path}: {e}") from None

    # Parsing runs one block ahead in a thread (Arrow releases the GIL), overlapping the
    # caller's hashing and writing of the block before.
    from .stream import Prefetch

    it = Prefetch(blocks, depth=2)
    try:
        yield from it
    finally:
        it.close()


def header(path: Path, delimiter: str) -> list[str]:
    import pyarrow as pa

    head = b""
    with pa.input_stream(str(path), compression="detect") as f:
        while b"\n" not in head:
            more = f.read(1 << 16)
            if not more:
                break
            head += more
    line = head.split(b"\n", 1)[0].decode("utf-8").rstrip("\r")
    if not line:
        raise DataError(f"{path}: empty file (no header)")
    return line.split(delimiter)


def label_values(column, accepted: Sequence[str], ones: Sequence[str] = ("1",)) -> tuple[np.ndarray, Optional[int]]:  # noqa: ANN001
    """(float32 0/1 labels, index of the first value not in ``accepted`` after trimming spaces, or None)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    s = pc.utf8_trim_whitespace(column)
    ok = pc.is_in(s, value_set=pa.array(list(accepted)))
    bad = None if pc.all(ok).as_py() else first_bad(pc.invert(ok))
    return pc.is_in(s, value_set=pa.array(list(ones))).to_numpy(zero_copy_only=False).astype(np.float32), bad


def first_bad(mask) -> int:  # noqa: ANN001
    """Index of the first True of a boolean Arrow array."""
    return int(np.nonzero(np.asarray(mask.to_numpy(zero_copy_only=False), bool))[0][0])
