"""torchrec-adaptive: frequency- and recency-adaptive fused optimizers for TorchRec embedding tables.

``apply_optimizer_in_backward(torchrec_adaptive.AdamAR, ebc.parameters(), {...})``
names the rule; the kernel in :mod:`torchrec_adaptive.kernels` runs it inside backward.
"""

from .diagnostics import row_statistics
from .epochs import EpochReport, MEDAConfig, start_epoch
from .kernels import BatchedAdaptiveEmbeddingBag, TableSpec
from .rules import (Adam, AdamAR, AdamARConfig, AdamConfig, FALConfig, RowWiseAdagrad, RowWiseAdagradConfig,
                    RowWiseRMSpropAR, RowWiseRMSpropARConfig)



def sharders() -> list:  # type: ignore[type-arg]
    """Our EmbeddingBagCollection sharder plus TorchRec's defaults, for ``DistributedModelParallel``.

    Imported lazily so that ``import torchrec_adaptive`` (rules, kernel) never imports torchrec.
    """
    from .distributed import sharders as _sharders

    return _sharders()


__all__ = [
    "Adam",
    "AdamAR",
    "AdamARConfig",
    "AdamConfig",
    "BatchedAdaptiveEmbeddingBag",
    "EpochReport",
    "MEDAConfig",
    "FALConfig",
    "RowWiseAdagrad",
    "RowWiseAdagradConfig",
    "RowWiseRMSpropAR",
    "RowWiseRMSpropARConfig",
    "TableSpec",
    "row_statistics",
    "sharders",
    "start_epoch",
]
