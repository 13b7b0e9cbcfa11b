"""torchrec-adaptive: frequency- and recency-adaptive fused optimizers for TorchRec embedding tables.

``apply_optimizer_in_backward(torchrec_adaptive.AdamAR, ebc.parameters(), {...})``
names the rule; the kernel in :mod:`torchrec_adaptive.kernels` runs it inside backward.
"""

from typing import Any

from .diagnostics import row_statistics
from .epochs import EpochReport, MEDAConfig, start_epoch
from .kernels import AdaptiveTBE, TableSpec
from .rules import (Adam, AdamAR, AdamARConfig, AdamConfig, FALConfig, RowWiseAdagrad, RowWiseAdagradConfig,
                    RowWiseRMSpropAR, RowWiseRMSpropARConfig)



def sharders(**kwargs: Any) -> list:  # type: ignore[type-arg]
    """Our EmbeddingBagCollection sharder plus TorchRec's defaults, for ``DistributedModelParallel``;
    ``kwargs`` as :func:`torchrec_adaptive.distributed.sharders` (the kernel options, e.g.
    ``backend="triton"``, ``sync_check_interval=10``).

    Imported lazily so that ``import torchrec_adaptive`` (rules, kernel) never imports torchrec.
    """
    from .distributed import sharders as _sharders

    return _sharders(**kwargs)


__all__ = [
    "Adam",
    "AdamAR",
    "AdamARConfig",
    "AdamConfig",
    "AdaptiveTBE",
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
