"""The fused table-batched embedding kernel (pure torch; no torchrec import)."""

from .batched import BatchedAdaptiveEmbeddingBag, default_weights_init
from .layout import TableSpec

__all__ = ["BatchedAdaptiveEmbeddingBag", "TableSpec", "default_weights_init"]
