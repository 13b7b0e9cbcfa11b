"""The fused table-batched embedding kernel (pure torch; no torchrec import)."""

from .batched import AdaptiveTBE, default_weights_init, raise_refused_steps
from .inputs import KernelOptions
from .layout import TableSpec

__all__ = ["AdaptiveTBE", "KernelOptions", "TableSpec", "default_weights_init", "raise_refused_steps"]
