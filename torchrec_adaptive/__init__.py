"""torchrec-adaptive: frequency- and recency-adaptive fused optimizers for TorchRec embedding tables.

``apply_optimizer_in_backward(torchrec_adaptive.AdamAR, ebc.parameters(), {...})``
names the rule; the kernel in :mod:`torchrec_adaptive.kernels` runs it inside backward.
"""

from .kernels import BatchedAdaptiveEmbeddingBag, TableSpec
from .rules import Adam, AdamAR, AdamARConfig, AdamConfig, FALConfig, RowWiseAdagrad, RowWiseAdagradConfig

__all__ = [
    "Adam",
    "AdamAR",
    "AdamARConfig",
    "AdamConfig",
    "BatchedAdaptiveEmbeddingBag",
    "FALConfig",
    "RowWiseAdagrad",
    "RowWiseAdagradConfig",
    "TableSpec",
]
