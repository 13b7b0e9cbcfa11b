"""The names the app's configs give the embedding tables' optimizers: one name per optimizer.

``sparse_optimizer.name`` and the method configs use the same words: a bare name
(``adam``, ``adamar``, ``rowwise_adagrad``) is ours, run by the torchrec_adaptive
kernel; ``stock_*`` is FBGEMM's fused optimizer through stock TorchRec. The method that
trains with FBGEMM's row-wise Adagrad is therefore ``stock_rowwise_adagrad``
(``configs/*/stock_rowwise_adagrad.yaml``); it was called ``rowwise_adagrad`` while
``sparse_optimizer.name: rowwise_adagrad`` meant ours, and loading that old name says so.

Both ``config.py`` (validation) and ``optim.py`` (building) read this table, so neither
imports the other's internals (``optim.py`` imports ``config.py``'s dataclasses only).
"""

from __future__ import annotations

from typing import Any

from ...rules import Adam, AdamAR, RowWiseAdagrad

# Ours: the torchrec_adaptive optimizer class of each name.
OURS: dict[str, Any] = {"adam": Adam, "adamar": AdamAR, "rowwise_adagrad": RowWiseAdagrad}
# Stock: FBGEMM's fused optimizers through TorchRec (built in optim.py, which imports torchrec).
STOCK = ("stock_rowwise_adagrad", "stock_adam")
# Method configs renamed so that a name means one optimizer: old file stem -> new one.
RENAMED_METHODS = {"rowwise_adagrad": "stock_rowwise_adagrad"}


def our_optimizer(name: str) -> Any:
    """The torchrec_adaptive optimizer class a config names (``name`` in :data:`OURS`)."""
    if name not in OURS:
        raise ValueError(f"sparse optimizer {name!r} is not one of ours {sorted(OURS)}")
    return OURS[name]


def renamed_method_hint(stem: str) -> str:
    """Why a method config of a previous name is not found (empty when ``stem`` was not renamed)."""
    new = RENAMED_METHODS.get(stem)
    if new is None:
        return ""
    return (f"; the method {stem!r} (FBGEMM's stock row-wise Adagrad) is now {new!r}: "
            f"use {new}.yaml (sparse_optimizer.name {stem!r} is our RowWiseAdagrad, 'stock_{stem}' FBGEMM's)")
