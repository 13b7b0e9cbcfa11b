"""The names of the optimizer-state slots: FBGEMM's where the quantity is FBGEMM's, ours otherwise.

The names are what users and TorchRec tooling read: a sharded table's fused-optimizer
state is ``<table>.<slot>`` in ``fused_optimizer.state_dict()`` and in DCP checkpoints.
Stock TorchRec (torchrec 1.8.0, ``EmbeddingFusedOptimizer``) names FBGEMM's state as
follows: the first state of every table is ``momentum1`` (FBGEMM's buffer name, "for
backward compatibility"), the others keep the names of FBGEMM's
``get_optimizer_state`` (``split_table_batched_embeddings_ops_training.py``). So a stock
checkpoint of

* ``EXACT_ROWWISE_ADAGRAD`` holds ``<table>.momentum1`` (the row's sum G_r, FBGEMM's
  ``sum``), and with counter-based regularization also ``prev_iter`` and ``row_counter``;
* ``ADAM`` holds ``<table>.momentum1`` (m, FBGEMM's ``exp_avg``) and
  ``<table>.exp_avg_sq`` (v; FBGEMM's buffer ``momentum2``).

Our slots take these names where they hold the same quantity, so a checkpoint moves
between stock TorchRec and ours in both directions and TorchRec's tooling
(``compare_opt_local_t`` reads ``<table>.momentum1``) works on our tables:

=================== ============================================ ==================
slot                quantity                                     FBGEMM / TorchRec
=================== ============================================ ==================
``momentum1``       row-wise Adagrad's G_r, row-wise RMSprop's   ``momentum1``
                    v_r; Adam's first moment m (per element)
``exp_avg_sq``      Adam's second moment v (per element)         ``exp_avg_sq``
``prev_iter``       s_r, the step k of the row's last update     ``prev_iter``
                    (0: never; int64 here, float32 in FBGEMM)
``row_count``       c_r, the row's occurrences, duplicates in a  (none: see below)
                    batch counted (METHODS.md)
=================== ============================================ ==================

``row_count`` keeps a name of its own: FBGEMM's ``row_counter`` counts one per step a
row is touched, whatever its duplicates, and its ``counter_halflife=0`` means "1 if
seen", ours "no decay". Giving ours FBGEMM's name would let a stock counter checkpoint
load into c_r silently, with another meaning.

Checkpoints and state dicts written before these names (``momentum``, ``exp_avg``,
``row_last_step``) still load: :data:`PREVIOUS_NAMES` maps each to its current name
(one to one within a rule, the quantity unchanged), used by the unsharded optimizers'
``load_state_dict``, the kernel's ``load_state_dict`` and ``distributed.checkpoint``.
We map instead of refusing because nothing is ambiguous and refusing would strand
every checkpoint of a long run for a rename.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, TypeVar

ACCUMULATOR = "momentum1"  # row-wise Adagrad's G_r / row-wise RMSprop's v_r: FBGEMM's momentum1
FIRST_MOMENT = "momentum1"  # Adam's m: TorchRec's key for FBGEMM's first state
SECOND_MOMENT = "exp_avg_sq"  # Adam's v: FBGEMM's get_optimizer_state name, kept by TorchRec
LAST_STEP = "prev_iter"  # s_r: FBGEMM's counter-based regularization's prev_iter
COUNT = "row_count"  # c_r: ours (FBGEMM's row_counter is another count, see the module docstring)

# Names before FBGEMM's were adopted -> current names.
PREVIOUS_NAMES: Mapping[str, str] = {
    "momentum": ACCUMULATOR,
    "exp_avg": FIRST_MOMENT,
    "row_last_step": LAST_STEP,
}

# The order FBGEMM lists its states in (TorchRec names whatever comes first ``momentum1``).
_FBGEMM_ORDER = (ACCUMULATOR, SECOND_MOMENT, LAST_STEP)

T = TypeVar("T")


def fbgemm_order(names: Iterable[T]) -> list[T]:
    """``names`` (slot names, or slots with a ``.name``) with FBGEMM's slots first, in FBGEMM's
    order, ours after in their own order: TorchRec's ``EmbeddingFusedOptimizer`` calls a
    table's first state ``momentum1``, which must then be the slot really called so."""
    items = list(names)

    def rank(item: T) -> int:
        name = item if isinstance(item, str) else getattr(item, "name")
        return _FBGEMM_ORDER.index(name) if name in _FBGEMM_ORDER else len(_FBGEMM_ORDER)

    return sorted(items, key=rank)  # stable: ours keep their order


def current_name(name: str) -> str:
    """The current name of a slot saved as ``name`` (itself when not a previous name)."""
    return PREVIOUS_NAMES.get(name, name)


def previous_names(name: str) -> list[str]:
    """The previous names a current slot ``name`` may have been saved under."""
    return [old for old, new in PREVIOUS_NAMES.items() if new == name]


def with_current_names(slots: Mapping[str, T]) -> dict[str, T]:
    """``slots`` (slot name -> value) with previous names replaced by current ones; a current
    name that is also present wins (a state cannot hold both unless it was merged by hand)."""
    out: dict[str, T] = {}
    for name, value in slots.items():
        new = current_name(name)
        if new != name and new in slots:
            continue
        out[new] = value
    return out


def rename_previous_buffers(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """A ``register_load_state_dict_pre_hook`` for modules keeping slot ``s`` in the buffer
    ``state_<s>`` (the fused kernel): buffers saved under a previous slot name load into
    the current one."""
    for old, new in PREVIOUS_NAMES.items():
        key, want = f"{prefix}state_{old}", f"{prefix}state_{new}"
        if key in state_dict and want not in state_dict and hasattr(module, f"state_{new}"):
            state_dict[want] = state_dict.pop(key)
