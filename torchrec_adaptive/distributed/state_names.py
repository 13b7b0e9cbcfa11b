"""Which checkpoint key each optimizer state of our tables is read from: checkpoints written
before the FBGEMM names, and checkpoints of stock TorchRec.

Our slots carry FBGEMM's names where the quantity is FBGEMM's (``rules/slot_names.py``),
so a checkpoint of a stock TorchRec table (FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` or
``ADAM``, fused) holds the very keys of our ``RowWiseAdagrad`` / ``Adam`` state:
``<table>.momentum1`` (and ``<table>.exp_avg_sq``). Two things still differ, and this
module resolves them for ``checkpoint.check`` / ``checkpoint.load``:

* **Previous names.** Our checkpoints written before the rename hold ``<table>.momentum``
  / ``exp_avg`` / ``row_last_step``. They load: a key the checkpoint lacks is read from
  its previous name when the checkpoint has that one (``slot_names.PREVIOUS_NAMES``,
  one to one, the same quantity).
* **Stock checkpoints** lack what FBGEMM does not keep: each table's step entry
  ``<table>.optimizer_step`` (k, the epoch, which optimizer wrote it), s_r
  (``prev_iter``, unless FBGEMM ran counter-based regularization) and c_r
  (``row_count``). They load with ``from_stock=True`` only, the caller saying where
  the checkpoint comes from: the table's FBGEMM-named state is read and the model keeps
  its own k, s_r and c_r for that table (a fresh model: 0, as a fresh stock model
  keeps its own ``iter``; stock TorchRec does not save FBGEMM's ``iter`` either).
  Without it such a checkpoint is refused, the message saying so: we record which
  optimizer wrote each table to refuse foreign state (Adam's moments into AdamAR), and
  a stock checkpoint cannot say.

The model's state dict stays as it is (current names, every entry): the view built here
shares its tensors and only changes which keys DCP reads into them.
"""

from __future__ import annotations

from typing import Any, Collection, Dict, Iterable, List

from ..rules.slot_names import COUNT, LAST_STEP, previous_names
from .kernel import STEP_SLOT

# What FBGEMM does not keep (absent from stock checkpoints) and a stock load leaves as the model has it.
OURS_ONLY = (STEP_SLOT, LAST_STEP, COUNT)


def _held(saved_keys: Collection[str], key: str) -> bool:
    """Whether the checkpoint holds ``key`` (a tensor, or a dict like the step entry)."""
    if key in saved_keys:
        return True
    prefix = key + "."
    return any(k.startswith(prefix) for k in saved_keys)


def checkpoint_view(state: Dict[str, Any], saved_keys: Iterable[str], *, from_stock: bool = False) -> Dict[str, Any]:
    """``state`` (``checkpoint.state_dict``) with the fused-optimizer entries of each table keyed as
    the checkpoint (``saved_keys``: its flat DCP keys) holds them; the values are ``state``'s own
    objects, so ``dcp.load`` of the view fills ``state``. See the module docstring."""
    saved = set(saved_keys)
    optim = state.get("optim")
    if not isinstance(optim, dict) or not isinstance(optim.get("state"), dict):
        return state
    view_state: Dict[str, Any] = {}
    for param_key, slots in optim["state"].items():
        prefix = f"optim.state.{param_key}."
        entries: Dict[str, Any] = {}
        for key, value in slots.items():
            table, _, slot = key.rpartition(".")
            if _held(saved, prefix + key):
                entries[key] = value
                continue
            old = next((f"{table}.{o}" for o in previous_names(slot) if _held(saved, prefix + f"{table}.{o}")), None)
            if old is not None:
                entries[old] = value
            elif from_stock and slot in OURS_ONLY and not _held(saved, prefix + f"{table}.{STEP_SLOT}"):
                continue  # a stock table: the model keeps its own
            else:
                entries[key] = value  # missing: check() names it
        view_state[param_key] = entries
    return {**state, "optim": {**optim, "state": view_state}}


def stock_hint(slot: str, held: List[str]) -> str:
    """Appended to "optimizer state <slot> is missing" for a table whose step entry is missing (once
    per table: on its step k) and who holds no step entry at all, as in stock TorchRec's: how to load it."""
    suffix = f".{STEP_SLOT}.step"
    if not slot.endswith(suffix):
        return ""
    table = slot[: -len(suffix)]
    if any(h.startswith(f"{table}.{STEP_SLOT}") for h in held):
        return ""
    return (f"; the checkpoint has no '{table}.{STEP_SLOT}', so stock TorchRec's fused optimizer (FBGEMM) wrote "
            f"this table: checkpoint.load(..., from_stock=True) reads its FBGEMM-named state and keeps this "
            f"model's step k, {LAST_STEP} and {COUNT}")


__all__ = ["OURS_ONLY", "checkpoint_view", "stock_hint"]
