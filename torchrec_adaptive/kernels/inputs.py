"""Checks on what the kernel is fed, with errors that name the table and feature.

A bad ID must never reach the weights (an out-of-range ``index_select`` either
crashes far from the cause or, with clamping, silently trains the wrong row), and
a bad call must fail before any state changes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .layout import TableLayout

BOUNDS_CHECK_MODES = ("error", "warn", "off")
NONFINITE_MODES = ("raise", "skip")


@dataclass(frozen=True)
class KernelOptions:
    """How a table's kernel treats bad input; per table, from the optimizer kwargs
    ``bounds_check`` / ``nonfinite`` (``apply_optimizer_in_backward``) or the sharder's
    defaults. Frozen and hashable: TorchRec groups tables by their fused params, so
    tables with different options get different kernels."""

    bounds_check: str = "error"
    nonfinite: str = "raise"

    def __post_init__(self) -> None:
        if self.bounds_check not in BOUNDS_CHECK_MODES:
            raise ValueError(f"bounds_check must be one of {BOUNDS_CHECK_MODES}, got {self.bounds_check!r}")
        if self.nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {self.nonfinite!r}")

    @staticmethod
    def split(kwargs: dict[str, Any], default: "KernelOptions | None" = None) -> tuple["KernelOptions", dict[str, Any]]:
        """(the options named in ``kwargs`` over ``default``, the remaining kwargs: the rule's)."""
        base = default or KernelOptions()
        rest = dict(kwargs)
        return KernelOptions(bounds_check=rest.pop("bounds_check", base.bounds_check),
                             nonfinite=rest.pop("nonfinite", base.nonfinite)), rest


def check_input_tensors(
    layout: TableLayout, indices: Tensor, offsets: Tensor, per_sample_weights: Tensor | None, validate_offsets: bool
) -> int:
    """Dtypes, shapes and offsets consistency; returns the batch size B."""
    num_features = len(layout.feature_table_map)
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
    if offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"offsets must be int32 or int64, got {offsets.dtype}")
    if indices.dim() != 1 or offsets.dim() != 1:
        raise ValueError(f"indices and offsets must be 1-D, got shapes {tuple(indices.shape)} and {tuple(offsets.shape)}")
    if (offsets.numel() - 1) % num_features != 0 or offsets.numel() < 1:
        raise ValueError(
            f"offsets has {offsets.numel()} entries; expected num_features * batch_size + 1 "
            f"with num_features={num_features} (TorchRec's KJT layout, include_last_offset)"
        )
    if per_sample_weights is not None:
        if not per_sample_weights.is_floating_point():
            raise TypeError(f"per_sample_weights must be floating point, got {per_sample_weights.dtype}")
        if per_sample_weights.shape != indices.shape:
            raise ValueError(
                f"per_sample_weights has shape {tuple(per_sample_weights.shape)} but indices has {tuple(indices.shape)}"
            )
    if validate_offsets and offsets.numel() > 0:
        first, last = int(offsets[0]), int(offsets[-1])
        if first != 0 or last != indices.numel():
            raise ValueError(f"offsets must start at 0 and end at len(indices)={indices.numel()}, got {first} and {last}")
        if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
            bag = int((offsets[1:] < offsets[:-1]).nonzero()[0, 0])
            raise ValueError(f"offsets must be non-decreasing; bag {bag} has a negative length")
    return (offsets.numel() - 1) // num_features


def check_bounds(
    layout: TableLayout, indices: Tensor, feature_of_lookup: Tensor, feature_rows: Tensor, mode: str
) -> Tensor:
    """Returns the indices to use: unchanged, or clamped (``warn``); raises for ``error``."""
    if mode == "off" or indices.numel() == 0:
        return indices
    limit = feature_rows[feature_of_lookup]
    bad = (indices < 0) | (indices >= limit)
    if not bool(bad.any()):
        return indices
    pos = int(bad.nonzero()[0, 0])
    f = int(feature_of_lookup[pos])
    table = layout.tables[layout.feature_table_map[f]]
    msg = (
        f"{layout.feature_name(f)}: ID {int(indices[pos])} is out of range [0, {table.num_rows}) "
        f"({int(bad.sum())} bad IDs in this batch)"
    )
    if mode == "error":
        raise IndexError(msg)
    warnings.warn(msg + "; clamped into range", RuntimeWarning, stacklevel=3)
    return torch.minimum(indices.clamp(min=0), limit - 1)


def nonfinite_features(layout: TableLayout, grad_output: Tensor, feature_cols: list[tuple[int, int]]) -> list[str]:
    """Names of the features whose pooled-output gradient has a NaN or Inf.

    ``torch.isfinite`` over the whole gradient costs several passes; a column sum
    propagates any NaN/Inf in one pass, and only columns it flags (a true
    non-finite value, or a float32 overflow of the sum) get the exact check.
    """
    suspect = ~torch.isfinite(grad_output.sum(dim=0))
    if not bool(suspect.any()):
        return []
    finite_cols = torch.isfinite(grad_output).all(dim=0)
    return [layout.feature_name(f) for f, (a, b) in enumerate(feature_cols) if not bool(finite_cols[a:b].all())]
