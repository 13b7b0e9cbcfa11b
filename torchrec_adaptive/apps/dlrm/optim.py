"""Optimizer names of the app's configs -> optimizer classes, and the dense optimizer.

Embedding tables get their optimizer through ``apply_optimizer_in_backward`` (fused:
ours run in our kernel, stock ones in FBGEMM's TBE); everything else (MLPs, MLET's V)
gets a TorchRec ``KeyedOptimizerWrapper`` around a ``torch.optim`` class, so its state
is keyed by parameter name and saves through ``torch.distributed.checkpoint``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ...rules import Adam, AdamAR, RowWiseAdagrad
from .config import DenseOptimizerConfig, SparseOptimizerConfig

_OURS = {"adam": Adam, "adamar": AdamAR, "rowwise_adagrad": RowWiseAdagrad}


def our_optimizer(name: str) -> Any:
    return _OURS[name]


PER_EPOCH = "alpha_per_epoch"


def per_step_kwargs(cfg: SparseOptimizerConfig, steps_per_epoch: int) -> dict[str, Any]:
    """The optimizer kwargs with AdamAR's decay given per epoch (``alpha_per_epoch``) turned into
    the per-step ``alpha`` the rule takes: alpha = alpha_per_epoch / steps_per_epoch, so a row idle
    for a whole epoch loses min(1, alpha_per_epoch) of its weight at its next touch, whatever the
    batch size and data size (docs/results.md, "An alpha that needs no tuning"). A per-step ``alpha``
    given as well replaces it (a ``--set sparse_optimizer.kwargs.alpha=...`` on a config that has
    ``alpha_per_epoch``). Other kwargs pass unchanged."""
    kwargs = dict(cfg.kwargs)
    if PER_EPOCH not in kwargs:
        return kwargs
    value = kwargs.pop(PER_EPOCH)
    if cfg.name != "adamar":
        raise ValueError(f"sparse_optimizer.kwargs.{PER_EPOCH} is AdamAR's decay per epoch; optimizer {cfg.name!r} "
                         f"has none")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or value == float("inf"):
        raise ValueError(f"sparse_optimizer.kwargs.{PER_EPOCH} must be a number >= 0, got {value!r}")
    if "alpha" in kwargs:  # a per-step alpha given as well (e.g. --set sparse_optimizer.kwargs.alpha=...) wins
        return kwargs
    if steps_per_epoch < 1:
        raise ValueError(f"{PER_EPOCH} needs the steps per epoch, got {steps_per_epoch}")
    kwargs["alpha"] = min(1.0, float(value) / steps_per_epoch)  # linear decay: alpha in [0, 1]
    return kwargs


def sparse_optimizer_class(cfg: SparseOptimizerConfig) -> Any:
    if cfg.name in _OURS:
        return _OURS[cfg.name]
    if cfg.name == "stock_rowwise_adagrad":
        import torchrec.optim as trec_optim

        return trec_optim.RowWiseAdagrad
    if cfg.name == "stock_adam":
        if not torch.cuda.is_available():
            raise ValueError("sparse_optimizer 'stock_adam' is FBGEMM's fused Adam, which runs on CUDA only "
                             "(FBGEMM: 'Optimizer adam is not supported in CPU mode'); use 'adam' (ours) on CPU")
        return torch.optim.Adam
    raise ValueError(f"unknown sparse optimizer {cfg.name!r}")


def apply_sparse_optimizer(tables: nn.Module, cfg: SparseOptimizerConfig, steps_per_epoch: int = 0) -> None:
    """``steps_per_epoch``: what turns ``alpha_per_epoch`` into ``alpha`` (only needed with it)."""
    from torch.distributed.optim import _apply_optimizer_in_backward as apply_optimizer_in_backward

    kwargs = per_step_kwargs(cfg, steps_per_epoch) if PER_EPOCH in cfg.kwargs else dict(cfg.kwargs)
    apply_optimizer_in_backward(sparse_optimizer_class(cfg), tables.parameters(), kwargs)


def dense_optimizer_factory(cfg: DenseOptimizerConfig) -> Callable[[Any], torch.optim.Optimizer]:
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
           "adagrad": torch.optim.Adagrad}[cfg.name]
    return lambda params: cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def dense_optimizer(model: nn.Module, cfg: DenseOptimizerConfig) -> Any:
    """A KeyedOptimizer over every parameter that has no optimizer applied in backward."""
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    return KeyedOptimizerWrapper(params, dense_optimizer_factory(cfg))
