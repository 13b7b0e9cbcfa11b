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

from .config import DenseOptimizerConfig, SparseOptimizerConfig
from .optimizer_names import OURS, our_optimizer


def sparse_optimizer_class(cfg: SparseOptimizerConfig) -> Any:
    """The optimizer class of ``sparse_optimizer.name`` (``optimizer_names``: bare names ours, ``stock_*`` FBGEMM's)."""
    if cfg.name in OURS:
        return our_optimizer(cfg.name)
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
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    from .decay_units import per_step_kwargs

    apply_optimizer_in_backward(sparse_optimizer_class(cfg), tables.parameters(), per_step_kwargs(cfg, steps_per_epoch))


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
