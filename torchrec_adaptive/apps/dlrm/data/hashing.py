"""ID hashing of Arrow string columns, vectorized with numpy.

Why by hand: pyarrow.compute has no CRC32 and no base-16 parse, and a Python loop over
``zlib.crc32``/``int(v, 16)`` per value is what made the old readers slow. Both work
on a column's distinct values only (``dictionary_encode``): click-log columns repeat
their values heavily, so a block of 65k rows has far fewer distinct strings. The rules
are the ones the readers always had, so converted data keeps its IDs:

- CRC32 (Avazu, generic tables): ``1 + zlib.crc32(utf8) % (vocab - 1)``, "" -> 0.
- hex (Criteo): ``1 + int(v, 16) % (vocab - 1)``, "" -> 0.
"""

from __future__ import annotations

import numpy as np


def _crc_table() -> np.ndarray:
    c = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        c = np.where(c & 1, np.uint32(0xEDB88320) ^ (c >> 1), c >> 1).astype(np.uint32)
    return c


_CRC = _crc_table()
_HEX = np.full(256, 255, np.uint8)
for _i, _ch in enumerate(b"0123456789abcdef"):
    _HEX[_ch] = _i
for _i, _ch in enumerate(b"ABCDEF"):
    _HEX[_ch] = 10 + _i


def _bytes(values) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # noqa: ANN001 (a pyarrow StringArray)
    """(start offsets, lengths, data bytes) of a string array, without copying the data."""
    import pyarrow as pa

    if values.type != pa.string():
        values = values.cast(pa.string())
    n = len(values)
    bufs = values.buffers()
    offsets = np.frombuffer(bufs[1], np.int32, count=n + 1, offset=4 * values.offset)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets[:-1].astype(np.int64), np.diff(offsets).astype(np.int64), data


def crc32(values) -> np.ndarray:  # noqa: ANN001
    """``zlib.crc32`` of every string's UTF-8 bytes, one byte position at a time across all strings."""
    return _crc32(*_bytes(values))


def _crc32(start: np.ndarray, lens: np.ndarray, data: np.ndarray) -> np.ndarray:
    crc = np.full(len(lens), 0xFFFFFFFF, np.uint32)
    for j in range(int(lens.max()) if len(lens) else 0):
        act = np.nonzero(lens > j)[0]
        c = crc[act]
        crc[act] = _CRC[(c ^ data[start[act] + j]) & 0xFF] ^ (c >> 8)
    return crc ^ np.uint32(0xFFFFFFFF)


def parse_hex(values) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """(value as uint64, bad) for hex strings of up to 16 digits; bad marks anything else."""
    return _parse_hex(*_bytes(values))


def _parse_hex(start: np.ndarray, lens: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # One digit position at a time over the strings that long (measured faster than one
    # [strings, 16] nibble matrix: most IDs are 8 digits).
    out = np.zeros(len(lens), np.uint64)
    bad = lens > 16
    for j in range(min(int(lens.max()) if len(lens) else 0, 16)):
        act = np.nonzero(lens > j)[0]
        d = _HEX[data[start[act] + j]]
        bad[act] |= d == 255
        out[act] = out[act] * np.uint64(16) + d.astype(np.uint64)
    return out, bad


def hashed_ids(column, vocab: int, rule: str) -> tuple[np.ndarray, int | None]:  # noqa: ANN001
    """IDs of one string column: (int64 [n], index of the first row that is not valid for ``rule``, or None)."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    enc = column.dictionary_encode()
    idx = enc.indices.to_numpy(zero_copy_only=False)
    start, lens, data = _bytes(enc.dictionary)
    empty = lens == 0
    if rule == "crc32":
        h = 1 + _crc32(start, lens, data).astype(np.int64) % (vocab - 1)
        bad = np.zeros(len(lens), bool)
    else:
        v, bad = _parse_hex(start, lens, data)
        h = 1 + (v % np.uint64(vocab - 1)).astype(np.int64)
    h[empty] = 0
    first_bad = int(np.nonzero(bad[idx])[0][0]) if bad.any() else None
    return h[idx], first_bad
