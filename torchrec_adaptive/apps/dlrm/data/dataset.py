"""The in-memory layout every reader produces, and its batching into TorchRec inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor


class DataError(ValueError):
    """Bad input data; the message names the file, line and column."""


@dataclass(frozen=True)
class ClickData:
    """Single-hot categorical fields, dense features and binary labels.

    ``sparse[i, f]`` is row i's ID in field f, in [0, vocab_sizes[f]); reserved ID 0
    means "missing" for the file readers.
    """

    dense: Tensor  # [N, num_dense] float32
    sparse: Tensor  # [N, num_fields] int64
    labels: Tensor  # [N] float32 in {0, 1}
    field_names: tuple[str, ...]
    vocab_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        if self.dense.shape[0] != n or self.sparse.shape[0] != n:
            raise DataError(f"row counts differ: dense {self.dense.shape[0]}, sparse {self.sparse.shape[0]}, labels {n}")
        if self.sparse.shape[1] != len(self.field_names) or len(self.vocab_sizes) != len(self.field_names):
            raise DataError("one field name and one vocabulary size per sparse column are needed")
        if n and bool((self.sparse < 0).any() or (self.sparse >= torch.tensor(self.vocab_sizes)).any()):
            f = int(((self.sparse < 0) | (self.sparse >= torch.tensor(self.vocab_sizes))).any(dim=0).nonzero()[0, 0])
            raise DataError(f"field {self.field_names[f]!r} has IDs outside [0, {self.vocab_sizes[f]})")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """(dense, sparse, labels) batches of this rank's share (rows i with i % world == rank)."""
        idx = torch.arange(len(self))
        if shuffle:
            idx = idx[torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))]
        idx = idx[rank::world_size]
        for start in range(0, idx.numel() - batch_size + 1, batch_size):
            sel = idx[start : start + batch_size]
            yield self.dense[sel], self.sparse[sel], self.labels[sel]
