"""Checks on a sharded EBC's input batch, in the user's terms, before TorchRec distributes it.

Our kernel checks its IDs too, but after TorchRec's input distribution a row-wise
shard sees local IDs (and an out-of-range global ID is bucketized into some shard as
a wrong local ID: ID 100 of a 100-row table arrives as local ID 50, -1 as 2^63 - 1),
so the kernel cannot say which ID the user fed. Here, on the rank that was given the
batch and before any collective, IDs are checked against the whole table, and what
the kernel cannot take (variable batch size per feature, non-float per-sample
weights) is refused with the feature names. One host sync per batch on CPU (as the
kernel's own check); on GPU this becomes a device-side flag (see kernels/batched.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclass(frozen=True)
class FeatureCheck:
    """One input feature of a table on our kernel."""

    table: str
    num_rows: int  # the whole table's
    bounds_check: str  # "error" | "warn" | "off"


def check_features(features: KeyedJaggedTensor, checks: Dict[str, FeatureCheck], weighted: bool) -> KeyedJaggedTensor:
    """``features`` unchanged, or with IDs clamped (``warn``); raises for bad input."""
    keys: Sequence[str] = features.keys()
    ours = [k for k in keys if k in checks]
    if not ours:
        return features
    if features.variable_stride_per_key():
        raise NotImplementedError(
            f"features {ours} have a variable batch size per feature (VBE), which torchrec_adaptive's kernel "
            "does not take; give every feature the same batch size")
    weights = features.weights_or_none()
    if weighted and weights is not None and not torch.is_floating_point(weights):
        raise TypeError(f"per-sample weights of features {ours} must be floating point, got {weights.dtype}")
    values = features.values()
    if values.numel() == 0:
        return features
    starts = features.offset_per_key()
    if not _any_out_of_range(values, starts, [checks.get(k) for k in keys]):
        return features
    clamped: List[tuple[int, int, int]] = []
    for i, key in enumerate(keys):
        check = checks.get(key)
        if check is None or check.bounds_check == "off":
            continue
        ids = values[starts[i]: starts[i + 1]]
        bad = (ids < 0) | (ids >= check.num_rows)
        if not bool(bad.any()):
            continue
        msg = (f"feature {key!r} (table {check.table!r}): ID {int(ids[bad.nonzero()[0, 0]])} is out of range "
               f"[0, {check.num_rows}) ({int(bad.sum())} bad IDs in this batch)")
        if check.bounds_check == "error":
            raise IndexError(msg)
        warnings.warn(msg + "; clamped into range", RuntimeWarning, stacklevel=4)
        clamped.append((starts[i], starts[i + 1], check.num_rows))
    if not clamped:
        return features
    values = values.clone()  # the caller's batch is left as it was
    for lo, hi, rows in clamped:
        values[lo:hi].clamp_(0, rows - 1)
    return KeyedJaggedTensor(keys=list(keys), values=values, weights=weights, lengths=features.lengths(),
                             offsets=features.offsets(), stride=features.stride())


def _any_out_of_range(values: torch.Tensor, starts: Sequence[int], checks: Sequence[FeatureCheck | None]) -> bool:
    """Whether any checked feature has an ID outside [0, rows): one pass over all values
    with a per-value bound (one host sync), instead of four ops and a sync per feature;
    only a batch with a bad ID goes on to the per-feature pass that names it."""
    lengths = [b - a for a, b in zip(starts[:-1], starts[1:])]
    # unchecked features get bounds no int64 ID can leave
    hi = [c.num_rows if c is not None and c.bounds_check != "off" else _NO_LIMIT for c in checks]
    lo = [0 if c is not None and c.bounds_check != "off" else -_NO_LIMIT - 1 for c in checks]
    n = values.numel()
    counts = torch.tensor(lengths, device=values.device)
    high = torch.repeat_interleave(torch.tensor(hi, device=values.device), counts, output_size=n)
    low = torch.repeat_interleave(torch.tensor(lo, device=values.device), counts, output_size=n)
    v = values.long()
    return bool(((v < low) | (v >= high)).any())


_NO_LIMIT = 2**63 - 1


__all__ = ["FeatureCheck", "check_features"]
