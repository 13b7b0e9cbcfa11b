"""Test batches shaped like TorchRec's KJT: Zipf IDs with duplicates, multi-hot and empty bags."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Batch:
    indices: Tensor
    offsets: Tensor
    per_sample_weights: Tensor | None
    batch_size: int

    def feature_slices(self, num_features: int) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        """Per feature (indices, offsets from 0, weights), for per-table references."""
        out = []
        for f in range(num_features):
            o = self.offsets[f * self.batch_size : (f + 1) * self.batch_size + 1]
            a, b = int(o[0]), int(o[-1])
            w = self.per_sample_weights[a:b] if self.per_sample_weights is not None else None
            out.append((self.indices[a:b], o - a, w))
        return out


def zipf_batch(
    table_rows: list[int],
    feature_table_map: list[int],
    batch_size: int,
    max_pooling: int,
    generator: torch.Generator,
    alpha: float = 1.05,
    weighted: bool = False,
    index_dtype: torch.dtype = torch.int64,
) -> Batch:
    """Bags of 0..max_pooling IDs (so some bags are empty), IDs Zipf(alpha) over a shuffled vocabulary."""
    idx, lens = [], []
    for t in feature_table_map:
        n = table_rows[t]
        length = torch.randint(0, max_pooling + 1, (batch_size,), generator=generator)
        p = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** alpha
        ranks = torch.multinomial(p, int(length.sum()), replacement=True, generator=generator) if length.sum() else torch.zeros(0, dtype=torch.long)
        perm = torch.randperm(n, generator=generator)
        idx.append(perm[ranks])
        lens.append(length)
    lengths = torch.cat(lens)
    offsets = torch.zeros(lengths.numel() + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    indices = torch.cat(idx)
    psw = torch.rand(indices.numel(), generator=generator) + 0.5 if weighted else None
    return Batch(indices.to(index_dtype), offsets.to(index_dtype), psw, batch_size)
