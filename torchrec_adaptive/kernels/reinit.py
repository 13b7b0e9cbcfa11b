"""Re-initialization values that depend only on (seed, epoch, table, global row, column).

MEDA re-initializes embedding rows between epochs, and the result must not depend
on the sharding plan or world size (METHODS.md): rank-local generators would give
each shard layout different values. A counter-based hash of the global coordinates
gives the same value for a cell whichever rank holds it. torch's generators are
stateful and have no public counter-based API, hence this small hash (a 32-bit
integer mix whose products stay below 2^63, so int64 arithmetic never overflows).

Row ids are 64-bit: the low 32 bits are hashed with the salt, and rows >= 2^32 mix
their high 32 bits in after that, so rows 2^32 apart get unrelated values while
every row < 2^32 keeps exactly the values it had when only 32 bits were hashed
(old checkpoints re-initialize the same).
"""

from __future__ import annotations

import zlib

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # from Thomas Mueller's 32-bit integer hash


def _hash32(x: Tensor) -> Tensor:
    x = x & _MASK32
    x = (((x >> 16) ^ x) * _MULT) & _MASK32
    x = (((x >> 16) ^ x) * _MULT) & _MASK32
    return (x >> 16) ^ x


def _hash32_int(x: int) -> int:
    return int(_hash32(torch.tensor([x], dtype=torch.int64))[0])


def table_salt(seed: int, epoch: int, table: str) -> int:
    """One 32-bit key per (seed, epoch, table)."""
    return _hash32_int(_hash32_int(seed & _MASK32) ^ _hash32_int(epoch) ^ zlib.crc32(table.encode()))


def hashed_uniform(salt: int, rows: Tensor, cols: Tensor, low: float, high: float) -> Tensor:
    """U(low, high) values [len(rows), len(cols)] for global ``rows`` x ``cols``."""
    rows = rows.to(torch.int64).unsqueeze(1)
    r = _hash32(rows ^ salt)  # _hash32 keeps the low 32 bits
    upper = rows >> 32
    r = torch.where(upper != 0, _hash32(r ^ _hash32(upper + 0x2545F491)), r)
    h = _hash32(r ^ _hash32(cols.to(torch.int64).unsqueeze(0) + 0x9E3779B))
    u = (h >> 8).to(torch.float64) / float(1 << 24)  # 24 random bits: exact in float32
    return (low + (high - low) * u).to(torch.float32)
