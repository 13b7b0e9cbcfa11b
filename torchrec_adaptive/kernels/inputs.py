"""Checks on what the kernel is fed, with errors that name the table and feature.

A bad ID must never reach the weights (an out-of-range ``index_select`` either
crashes far from the cause or, with clamping, silently trains the wrong row), and
a bad call must fail before any state changes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .layout import TableLayout

BOUNDS_CHECK_MODES = ("error", "warn", "off")
NONFINITE_MODES = ("raise", "skip")
BACKENDS = ("triton", "cpu", "eager")


@dataclass(frozen=True)
class KernelOptions:
    """How a table's kernel runs and treats bad input; per table, from the optimizer
    kwargs of the same names (``apply_optimizer_in_backward``) or the defaults given to
    ``sharders(...)``. Frozen and hashable: TorchRec groups tables by their fused params,
    so tables with different options get different kernels.

    * ``bounds_check``: ``"error"`` (raise naming table, feature and ID), ``"warn"``
      (clamp into range), ``"off"``.
    * ``nonfinite``: a NaN/Inf output gradient refuses the step's update; ``"raise"``
      a ``FloatingPointError`` or ``"skip"`` with a warning.
    * ``backend``: ``"triton"`` (fused GPU kernels, ``kernels/triton_rows.py``), ``"cpu"``
      (compiled CPU loops, ``kernels/fused_cpu.py``), ``"eager"`` (the rule's torch ops);
      None picks by the weights' device at each step: ``"cpu"`` on CPU, ``"triton"`` elsewhere.
    * ``sync_check_interval``: with the triton backend the checks run on the device and
      never stall the host; their flags are copied back without blocking every N steps
      and raised at the next step (so at most N steps late), see :class:`DeviceChecks`.
    * ``validate_offsets``: check offsets are monotone and end at len(indices).
    """

    bounds_check: str = "error"
    nonfinite: str = "raise"
    backend: str | None = None
    sync_check_interval: int = 1
    validate_offsets: bool = True

    def __post_init__(self) -> None:
        if self.bounds_check not in BOUNDS_CHECK_MODES:
            raise ValueError(f"bounds_check must be one of {BOUNDS_CHECK_MODES}, got {self.bounds_check!r}")
        if self.nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {self.nonfinite!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None (by device), got {self.backend!r}")
        n = self.sync_check_interval
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sync_check_interval must be an integer >= 1 (steps), got {n!r}")
        if not isinstance(self.validate_offsets, bool):
            raise ValueError(f"validate_offsets must be True or False, got {self.validate_offsets!r}")

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(f.name for f in fields(KernelOptions))

    def kernel_kwargs(self) -> dict[str, Any]:
        """The options as ``AdaptiveTBE`` keyword arguments."""
        return {name: getattr(self, name) for name in self.names()}

    @staticmethod
    def split(kwargs: dict[str, Any], default: "KernelOptions | None" = None) -> tuple["KernelOptions", dict[str, Any]]:
        """(the options named in ``kwargs`` over ``default``, the remaining kwargs: the rule's)."""
        base = default or KernelOptions()
        rest = dict(kwargs)
        return KernelOptions(**{name: rest.pop(name, getattr(base, name)) for name in KernelOptions.names()}), rest


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
            raise ValueError(offsets_range_message(indices.numel(), first, last))
        if offsets.numel() > 1 and bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(negative_bag_message(int((offsets[1:] < offsets[:-1]).nonzero()[0, 0])))
    return (offsets.numel() - 1) // num_features


def offsets_range_message(num_indices: int, first: int, last: int) -> str:
    """Offsets that do not span the indices, one wording for every check of them."""
    return f"offsets must start at 0 and end at len(indices)={num_indices}, got {first} and {last}"


def negative_bag_message(bag: int) -> str:
    return f"offsets must be non-decreasing; bag {bag} has a negative length"


def raise_or_warn_bad_ids(layout: TableLayout, feature: int, bad_id: int, count: int, mode: str) -> None:
    """The host checks' answer to out-of-range IDs: raise (``error``) or warn that they were
    clamped (``warn``), naming the first bad ID's table and feature."""
    msg = out_of_range_message(layout, feature, bad_id, f"{count} bad IDs in this batch")
    if mode == "error":
        raise IndexError(msg)
    warnings.warn(msg + "; clamped into range", RuntimeWarning, stacklevel=4)


def out_of_range_message(layout: TableLayout, feature: int, bad_id: int, detail: str) -> str:
    """The bad-ID error, one wording for the host check and the device-side flags."""
    table = layout.tables[layout.feature_table_map[feature]]
    return f"{layout.feature_name(feature)}: ID {bad_id} is out of range [0, {table.num_rows}) ({detail})"


def refused_update_message(bad: str, step: int) -> str:
    """A refused non-finite update, one wording for the host check and the device-side flags."""
    return (f"non-finite gradient for {bad}; the update was refused, weights and optimizer state are "
            f"unchanged (step k = {step})")


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
    raise_or_warn_bad_ids(layout, int(feature_of_lookup[pos]), int(indices[pos]), int(bad.sum()), mode)
    return torch.minimum(indices.clamp(min=0), limit - 1)


def nonfinite_features(layout: TableLayout, grad_output: Tensor, feature_cols: list[tuple[int, int]]) -> list[str]:
    """Names of the features whose pooled-output gradient has a NaN or Inf.

    ``torch.isfinite`` over the whole gradient costs several passes; one sum of all of it
    propagates any NaN/Inf in one pass (a quarter of the time of a per-column sum at
    kernel_step's shape), and only a non-finite sum (a true non-finite value, or a
    float32 overflow of the sum) gets the exact per-column check.
    """
    if bool(torch.isfinite(grad_output.sum())):
        return []
    finite_cols = torch.isfinite(grad_output).all(dim=0)
    return [layout.feature_name(f) for f, (a, b) in enumerate(feature_cols) if not bool(finite_cols[a:b].all())]


class DeviceChecks:
    """The input checks of :func:`check_input_tensors`, :func:`check_bounds` and
    :func:`nonfinite_features` without a host sync: what the triton backend runs.

    Each check keeps the step safe on the device and records its first failure in one
    small int64 tensor (``record``) beside the weights: bad offsets are repaired into a
    valid layout, a bad ID contributes nothing (``"error"``) or is clamped (``"warn"``),
    a non-finite output gradient masks the whole update (nothing changes; the step k
    advances, as on the host path). Every ``interval`` steps the record is copied to
    the host without blocking (pinned memory, an event), and the next :meth:`poll` --
    at the start of a forward -- raises or warns with the same messages as the host
    checks, naming table, feature and ID, and the step that failed. :meth:`check_now`
    waits for the device instead (the end of training, tests).

    Record layout: per check its failing step (0: none) then its details.
    """

    OFFSETS, BOUNDS, NONFINITE = 0, 5, 9  # offsets: step, first, last, len(indices), first bad bag
    # bounds: step, feature, ID, count; nonfinite: step, then one flag per feature

    def __init__(self, layout: TableLayout, feature_cols: list[tuple[int, int]], interval: int) -> None:
        self.layout = layout
        self.interval = interval
        self.size = self.NONFINITE + 1 + len(layout.feature_table_map)
        self._col_feature = torch.tensor([f for f, (a, b) in enumerate(feature_cols) for _ in range(a, b)])
        self._record: Tensor | None = None
        self._pending: tuple[Tensor, Any] | None = None

    def record(self, device: torch.device) -> Tensor:
        if self._record is None or self._record.device != device:
            self._record = torch.zeros(self.size, dtype=torch.long, device=device)
            self._col_feature = self._col_feature.to(device)
        return self._record

    def _note(self, device: torch.device, at: int, bad: Tensor, details: list[Tensor], step: int) -> None:
        """Record a failure at ``at`` unless that check already holds an unreported one."""
        rec = self.record(device)
        part = rec[at : at + 1 + len(details)]
        first = bad & (rec[at] == 0)
        values = torch.stack([torch.full((), step, dtype=torch.long, device=device), *[d.long() for d in details]])
        part.copy_(torch.where(first, values, part))

    def offsets(self, offsets: Tensor, num_indices: int, step: int) -> Tensor:
        """Offsets made valid (start 0, non-decreasing, end ``num_indices``), bad ones recorded."""
        n = offsets.numel()
        if n < 2:
            return offsets
        first, last = offsets[0], offsets[-1]
        neg = offsets[1:] < offsets[:-1]
        any_neg = neg.any()
        bad = (first != 0) | (last != num_indices) | any_neg
        bag = torch.where(any_neg, neg.to(torch.uint8).argmax(), -1)
        self._note(offsets.device, self.OFFSETS, bad,
                   [first, last, torch.full((), num_indices, device=offsets.device), bag], step)
        fixed = torch.cummax(offsets.clamp(0, num_indices), 0).values
        fixed[0] = 0
        fixed[-1] = num_indices
        return fixed

    def bounds(self, indices: Tensor, feature_of_lookup: Tensor, feature_rows: Tensor, mode: str,
               step: int) -> tuple[Tensor, Tensor | None]:
        """(indices clamped into range, the bad lookups' mask for ``"error"`` -- they must
        contribute nothing -- or None), the first bad ID recorded."""
        if mode == "off" or indices.numel() == 0:
            return indices, None
        limit = feature_rows[feature_of_lookup]
        bad = (indices < 0) | (indices >= limit)
        pos = bad.to(torch.uint8).argmax().reshape(1)  # a tensor index: indexing by a 0-d tensor reads it on the host
        self._note(indices.device, self.BOUNDS, bad.any(),
                   [feature_of_lookup.index_select(0, pos)[0], indices.index_select(0, pos)[0], bad.sum()], step)
        clamped = torch.minimum(indices.clamp(min=0), limit - 1)
        return clamped, (bad if mode == "error" else None)

    def nonfinite(self, grad_output: Tensor, step: int) -> Tensor:
        """1 if the output gradient is finite, else 0 (a 0-d device tensor that masks the update)."""
        if grad_output.numel() == 0:
            return torch.ones((), dtype=torch.long, device=grad_output.device)
        bad_cols = (~torch.isfinite(grad_output).all(dim=0)).long()
        rec = self.record(grad_output.device)
        per_feature = torch.zeros(rec.numel() - self.NONFINITE - 1, dtype=torch.long, device=grad_output.device)
        per_feature.index_add_(0, self._col_feature, bad_cols)
        any_bad = per_feature.any()
        self._note(grad_output.device, self.NONFINITE, any_bad, list((per_feature > 0).unbind()), step)
        return (~any_bad).long()

    def end_step(self, step: int) -> None:
        """Start the non-blocking copy of the record every ``interval`` steps."""
        if self._record is None or self._pending is not None or step % self.interval != 0:
            return
        rec = self._record
        if rec.device.type == "cuda":
            host = torch.empty(rec.shape, dtype=rec.dtype, pin_memory=True)
            host.copy_(rec, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:  # a CPU "copy" is immediate
            host, event = rec.clone(), None
        self._pending = (host, event)

    def poll(self) -> list[tuple[str, str]]:
        """(check, message) of what a finished copy holds; never waits for the device."""
        if self._pending is None:
            return []
        host, event = self._pending
        if event is not None and not event.query():
            return []
        self._pending = None
        return self._messages(host)

    def check_now(self) -> list[tuple[str, str]]:
        """Wait for the device; (check, message) of every failure recorded so far."""
        if self._record is None:
            return []
        out = []
        if self._pending is not None:
            host, event = self._pending
            if event is not None:
                event.synchronize()
            self._pending = None
            out = self._messages(host)
        return out + self._messages(self._record.cpu())

    def _messages(self, host: Tensor) -> list[tuple[str, str]]:
        values = host.numpy().tolist()  # a host copy: reading it waits for no device
        rec = self._record
        assert rec is not None
        lay = self.layout
        out: list[tuple[str, str]] = []
        spans = {self.OFFSETS: 5, self.BOUNDS: 4, self.NONFINITE: self.size - self.NONFINITE}
        for at, span in spans.items():
            step = values[at]
            if step == 0:
                continue
            part = rec[at : at + span]  # forget it on the device, unless a later failure replaced it
            part.copy_(torch.where(rec[at] == step, 0, part))
            if at == self.OFFSETS:
                first, last, n, bag = values[at + 1 : at + 5]
                msg = offsets_range_message(n, first, last) if first != 0 or last != n else negative_bag_message(bag)
                out.append(("offsets", f"{msg} (step {step}, checked on the device; that step used repaired offsets)"))
            elif at == self.BOUNDS:
                f, bad_id, count = values[at + 1 : at + 4]
                out.append(("bounds", out_of_range_message(
                    lay, f, bad_id, f"{count} bad IDs in this batch; step {step}, checked on the device")))
            else:
                names = [lay.feature_name(f) for f, flag in enumerate(values[at + 1 :]) if flag]
                out.append(("nonfinite", refused_update_message(", ".join(names), step)))
        return out
