"""Update rules as chains of per-row transforms. Pure torch: never imports torchrec."""

from .apply import RowUpdate, allocate_row_state, update_rows
from .base import RowBatch, RowChain, RowTransform, StateSlot
from .configs import AdamARConfig, AdamConfig, FALConfig, RowWiseAdagradConfig, RowWiseRMSpropARConfig, RuleConfig
from .optimizers import (
    ADAPTIVE_OPTIMIZERS,
    Adam,
    AdamAR,
    AdaptiveRowOptimizer,
    RowWiseAdagrad,
    RowWiseRMSpropAR,
    config_from_optimizer,
    count_quantile,
    is_adaptive_optimizer,
)

__all__ = [
    "ADAPTIVE_OPTIMIZERS",
    "Adam",
    "AdamAR",
    "AdamARConfig",
    "AdamConfig",
    "AdaptiveRowOptimizer",
    "FALConfig",
    "RowBatch",
    "RowChain",
    "RowTransform",
    "RowUpdate",
    "RowWiseAdagrad",
    "RowWiseAdagradConfig",
    "RowWiseRMSpropAR",
    "RowWiseRMSpropARConfig",
    "RuleConfig",
    "StateSlot",
    "allocate_row_state",
    "config_from_optimizer",
    "count_quantile",
    "is_adaptive_optimizer",
    "update_rows",
]
