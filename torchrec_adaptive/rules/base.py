"""The row-transform abstraction every update rule is built from.

An update rule is a chain of small per-row transforms, in the spirit of optax's
``GradientTransformation`` (init/update), but over *row-indexed* state: the kernel
coalesces the rows touched by a batch, gathers their weights and state, runs the
chain on those rows only, and scatters the results back. Untouched rows never
change, which is what makes the rules "lazy" like FBGEMM's fused optimizers.

Why not optax-style pure functions: the kernel must update state in place inside
backward without materializing whole tables, so a transform receives the gathered
rows of its own state slots and returns their new values; the kernel owns storage.

Hyperparameters live as plain mutable attributes of the transform (data, not
closures), so TorchRec's ``update_hyper_parameters`` and learning-rate schedules
change them without rebuilding anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor


@dataclass(frozen=True)
class StateSlot:
    """One piece of optimizer state a transform keeps for every row.

    ``per_element`` slots have the row's shape ``(dim,)`` (Adam's moments); the
    others hold one value per row (row-wise Adagrad's sum, the last-touched step).
    The kernel allocates slots from this declaration, so sharded state dicts can
    be built generically, sharded like the weights.
    """

    name: str
    dtype: torch.dtype = torch.float32
    per_element: bool = False
    init: float = 0.0


@dataclass
class RowBatch:
    """The coalesced rows touched in one step, as they flow through a chain.

    ``grad`` starts as the coalesced gradient and is turned into the update
    direction by ``scale_by_*`` transforms; ``weight`` is modified by decays and
    finally by :func:`~torchrec_adaptive.rules.transforms.apply_row_update`.
    ``extras`` carries per-row quantities that one transform publishes for later
    ones (``skipped`` = I_r, ``count`` = c_r) so they are computed once.
    """

    rows: Tensor  # [U] int64, row ids in the state buffers
    weight: Tensor  # [U, D]
    grad: Tensor  # [U, D]
    lr: Tensor  # [U, 1] per-row learning rate (lr * table multiplier * ...)
    occurrences: Tensor  # [U] float32, occurrences of each row in this batch
    step: int  # global optimizer step k, 1 on the first update
    epoch: int = 1
    table: Tensor | None = None  # [U] int64 table index of each row, None for one table
    # The optimizer's own learning rate (before kappa and FAL): what FBGEMM's
    # rowwise_rmsprop_ar shrink reads (interval="fbgemm"); None where no caller set it.
    base_lr: float | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    workspace: Any = None  # rules.apply.Workspace: reusable scratch, or None

    def scratch(self, name: str, like: Tensor) -> Tensor:
        """An uninitialized tensor shaped like ``like``, reused across steps when a workspace is given."""
        if self.workspace is None:
            return torch.empty_like(like)
        return self.workspace.get(name, tuple(like.shape), like.dtype, like.device)


@runtime_checkable
class RowTransform(Protocol):
    """A per-row transform: declares its state, updates the touched rows."""

    def slots(self) -> tuple[StateSlot, ...]: ...

    def update(self, batch: RowBatch, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Update ``batch`` in place and return the new rows of this transform's slots."""
        ...


def hyper_parameter_names(transform: RowTransform) -> tuple[str, ...]:
    """Float hyperparameters of a (dataclass) transform that may change at run time."""
    return tuple(
        f.name
        for f in fields(transform)  # type: ignore[arg-type]
        if f.type in ("float", float) and not f.name.startswith("_")
    )


class RowChain:
    """Runs transforms in order; the composition is itself a transform.

    Slot names must be unique across the chain: they become the optimizer-state
    keys TorchRec users see (``<table>.<slot>``), FBGEMM's names where the quantity is
    FBGEMM's (:mod:`.slot_names`), listed in FBGEMM's order.
    """

    def __init__(self, transforms: Sequence[RowTransform]) -> None:
        self.transforms: tuple[RowTransform, ...] = tuple(transforms)
        names = [s.name for t in self.transforms for s in t.slots()]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"state slot names must be unique in a chain, repeated: {sorted(dup)}")

    def slots(self) -> tuple[StateSlot, ...]:
        """Every transform's slots, FBGEMM's first (TorchRec names a table's first state ``momentum1``)."""
        from .slot_names import fbgemm_order

        return tuple(fbgemm_order(s for t in self.transforms for s in t.slots()))

    def update(self, batch: RowBatch, state: dict[str, Tensor]) -> dict[str, Tensor]:
        new_state: dict[str, Tensor] = {}
        for t in self.transforms:
            own = {s.name: state[s.name] for s in t.slots()}
            new_state.update(t.update(batch, own))
        return new_state

    def hyper_parameters(self) -> dict[str, float]:
        """Current values of every run-time-settable hyperparameter, by name."""
        out: dict[str, float] = {}
        for t in self.transforms:
            for name in hyper_parameter_names(t):
                out[name] = float(getattr(t, name))
        return out

    def set_hyper_parameters(self, params: dict[str, float]) -> None:
        """Set hyperparameters by name; an unknown name is an error, not a silent no-op."""
        known = self.hyper_parameters()
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown}; this rule has {sorted(known)}")
        for t in self.transforms:
            names = hyper_parameter_names(t)
            for name, value in params.items():
                if name in names:
                    validate = getattr(t, "validate", None)
                    old = getattr(t, name)
                    setattr(t, name, float(value))
                    if validate is not None:
                        try:
                            validate()
                        except ValueError:
                            setattr(t, name, old)
                            raise
