"""The fused table-batched embedding kernel (pure torch; no torchrec import)."""

from .batched import BatchedAdaptiveEmbeddingBag, default_weights_init, raise_refused_steps
from .inputs import KernelOptions
from .layout import TableSpec

__all__ = ["BatchedAdaptiveEmbeddingBag", "KernelOptions", "TableSpec", "default_weights_init", "raise_refused_steps"]
