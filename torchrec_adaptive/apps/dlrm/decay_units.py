"""AdamAR's decay in units that carry across data sets: ``alpha_per_epoch``.

AdamAR's lambda_r = min(1, alpha I_r) counts idle *steps*, so one alpha means another decay
when an epoch has more or fewer steps (batch size, data size). Given per epoch, alpha =
alpha_per_epoch / steps per epoch: a row idle for a whole epoch loses min(1, alpha_per_epoch)
of its weight at its next touch. docs/results.md ("An alpha that needs no tuning") shows one
value holding across five synthetic regimes where one per-step alpha did not. The app knows
the steps per epoch once the data is open; ``build_model`` passes them here.
"""

from __future__ import annotations

import math
from typing import Any

PER_EPOCH = "alpha_per_epoch"


def per_step_kwargs(cfg: Any, steps_per_epoch: int) -> dict[str, Any]:
    """``cfg.kwargs`` (a ``SparseOptimizerConfig``) with ``alpha_per_epoch`` turned into AdamAR's
    per-step ``alpha``. A per-step ``alpha`` given as well replaces it (``--set
    sparse_optimizer.kwargs.alpha=...`` on a config that has ``alpha_per_epoch``). Without
    ``alpha_per_epoch`` the kwargs pass unchanged."""
    kwargs = dict(cfg.kwargs)
    if PER_EPOCH not in kwargs:
        return kwargs
    value = kwargs.pop(PER_EPOCH)
    if cfg.name != "adamar":
        raise ValueError(f"sparse_optimizer.kwargs.{PER_EPOCH} is AdamAR's decay per epoch; optimizer {cfg.name!r} "
                         f"has none")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"sparse_optimizer.kwargs.{PER_EPOCH} must be a number >= 0, got {value!r}")
    if "alpha" in kwargs:
        return kwargs
    if steps_per_epoch < 1:
        raise ValueError(f"sparse_optimizer.kwargs.{PER_EPOCH} needs the steps per epoch, got {steps_per_epoch}")
    kwargs["alpha"] = min(1.0, float(value) / steps_per_epoch)  # the linear decay's alpha is in [0, 1]
    return kwargs
