"""``torch.distributed.checkpoint`` (DCP) save/load of a sharded model with our tables,
checked before anything is loaded.

DCP itself reshards: a checkpoint written on 2 ranks with a row-wise plan loads on
1 rank, or into a table-wise plan, because every weight and optimizer state of our
tables is a ShardedTensor with its global shape (see ``embeddingbag.py``,
``_initialize_torch_state``). What DCP does not do is tell a user *why* a checkpoint
does not fit: ``dcp.load`` copies into the model's tensors in place (the state dict
holds views of the kernel's buffers), and a checkpoint written by another optimizer
either fails with "Missing key in checkpoint state_dict: <flat key>" or, when the
slots happen to coincide (Adam vs AdamAR), loads silently. :func:`load` first
compares the checkpoint's metadata with the model (every key present, same global
shape, same optimizer for each of our tables) on every rank, raises one
``ValueError`` naming the table and key on all ranks if anything differs, and only
then loads. Each table's ``<table>.optimizer_step`` entry records the optimizer that
wrote it (``kernel.OptimizerStep``); loading it through
``fused_optimizer.load_state_dict`` also refuses another optimizer's state.

Known limit (TorchRec's layout, FBGEMM's too): the per-row states of a column-wise
sharded table are saved as one row-wise copy per column shard (global length
rows x shards), so they load only into the same column split.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from .kernel import OPTIMIZER_NAME_KEY, STEP_SLOT, drop_absent_epochs


def state_dict(model: nn.Module, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """What :func:`save` writes: ``{"model": model.state_dict(), "optim": fused optimizer state}``,
    plus each ``extra`` entry: an object's ``state_dict()`` (a dense optimizer) or a plain dict."""
    state = {"model": model.state_dict(), "optim": model.fused_optimizer.state_dict()}  # type: ignore[operator,union-attr]
    for key, value in (extra or {}).items():
        state[key] = value.state_dict() if hasattr(value, "state_dict") else value
    return state


def save(model: nn.Module, checkpoint_id: str, process_group: Optional[dist.ProcessGroup] = None,
         extra: Optional[Mapping[str, Any]] = None) -> None:
    """Collective DCP save of the model's weights and fused optimizer state (incl. each table's step k),
    and of ``extra`` (see :func:`state_dict`)."""
    dcp.save(state_dict(model, extra), checkpoint_id=checkpoint_id, process_group=process_group)


def _flatten(obj: Any, prefix: str, out: Dict[str, Any]) -> Dict[str, Any]:
    """DCP's flat keys for nested dicts (``a.b.c``)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = obj
    return out


def _global_shape(v: Any) -> Optional[Tuple[int, ...]]:
    if isinstance(v, ShardedTensor):
        return tuple(v.size())
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    return None


def _param_table(param_key: str) -> str:
    """``ebc.embedding_bags.t0.weight`` -> ``t0``."""
    parts = param_key.split(".")
    return parts[-2] if len(parts) >= 2 and parts[-1] == "weight" else param_key


def _our_optimizers(state: Dict[str, Any]) -> Dict[str, str]:
    """flat key of each of our tables' step entry -> the optimizer that owns the table in this model."""
    out = {}
    for param_key, slots in state.get("optim", {}).get("state", {}).items():
        for slot, value in slots.items():
            if slot.endswith(f".{STEP_SLOT}") and isinstance(value, dict) and OPTIMIZER_NAME_KEY in value:
                out[f"optim.state.{param_key}.{slot}.{OPTIMIZER_NAME_KEY}"] = str(value[OPTIMIZER_NAME_KEY])
    return out


def _read_optimizer_names(keys: List[str], checkpoint_id: str, pg: Optional[dist.ProcessGroup]) -> Dict[str, str]:
    """The optimizer names stored under ``keys`` (collective: every rank calls it)."""
    # A flat dict loads by exact FQN; a string value comes back as the stored object.
    flat = {k: "" for k in keys}
    dcp.load(flat, checkpoint_id=checkpoint_id, process_group=pg)
    return {k: str(v) for k, v in flat.items()}


def check(model: nn.Module, checkpoint_id: str, process_group: Optional[dist.ProcessGroup] = None,
          state: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Raise ``ValueError`` (on every rank) if the checkpoint cannot load into ``model`` as a whole.

    Collective. Returns the model's state dict (views of its tensors), ready for ``dcp.load``.
    """
    state = state if state is not None else state_dict(model)
    metadata = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    state = drop_absent_epochs(state, metadata)  # older checkpoints have no epoch: the model keeps its own
    flat = _flatten(state, "", {})
    problems: List[str] = []
    by_table: Dict[str, List[str]] = {}
    for key, value in flat.items():
        where = key.split(".state.", 1)[1] if key.startswith("optim.state.") else key
        if key not in metadata:
            by_table.setdefault(where, []).append("missing")
            continue
        md = metadata[key]
        want = _global_shape(value)
        have = tuple(md.size) if isinstance(md, dcp.TensorStorageMetadata) else None
        if want is not None and have is not None and want != have:
            problems.append(f"{where}: global shape {list(have)} in the checkpoint, {list(want)} in the model")
        elif want is not None and have is None:
            problems.append(f"{where}: the checkpoint holds a non-tensor value where the model has a tensor")
    # Name missing keys by table, with what the checkpoint holds for that table instead.
    param_keys = list(state.get("optim", {}).get("state", {}))
    for where in by_table:
        param = next((p for p in param_keys if where.startswith(p + ".")), None)
        if param is None:
            problems.append(f"{where}: missing from the checkpoint")
            continue
        slot = where[len(param) + 1:]
        prefix = f"optim.state.{param}."
        held = sorted(k[len(prefix):] for k in metadata if k.startswith(prefix))
        problems.append(f"table {_param_table(param)!r}: optimizer state {slot!r} is missing from the checkpoint "
                        f"(it holds {held or 'no optimizer state'} for this table)")
    ours = {k: v for k, v in _our_optimizers(state).items() if k in metadata}
    # Every rank must take part in the collective read, whatever its own keys.
    gathered: List[Any] = [None] * (dist.get_world_size(process_group) if dist.is_initialized() else 1)
    if dist.is_initialized():
        dist.all_gather_object(gathered, sorted(ours), group=process_group)
        all_keys = sorted({k for ks in gathered for k in ks})
    else:
        all_keys = sorted(ours)
    names = _read_optimizer_names(all_keys, checkpoint_id, process_group) if all_keys else {}
    for key, mine in ours.items():
        theirs = names.get(key, "")
        if theirs != mine:
            param = key[len("optim.state."):].rsplit(".", 3)[0]
            problems.append(f"table {_param_table(param)!r}: the checkpoint was written by optimizer {theirs!r}, "
                            f"the model trains it with {mine!r}")
    if dist.is_initialized():
        every: List[Any] = [None] * dist.get_world_size(process_group)
        dist.all_gather_object(every, problems, group=process_group)
        problems = sorted({p for ps in every for p in ps})
    if problems:
        raise ValueError(f"checkpoint {checkpoint_id!r} does not fit the model; nothing was loaded:\n  "
                         + "\n  ".join(problems))
    return state


def load(model: nn.Module, checkpoint_id: str, process_group: Optional[dist.ProcessGroup] = None,
         extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Collective: :func:`check` (``extra`` included), then load weights and fused optimizer state
    (any plan, any world size) and ``extra``: objects get ``load_state_dict``, plain dicts are
    filled in place. Returns what was loaded. DCP loads in place, so an ``extra`` object's state
    must already exist (a torch optimizer: ``KeyedOptimizer.init_state()`` first)."""
    state = check(model, checkpoint_id, process_group, state=state_dict(model, extra))
    dcp.load(state, checkpoint_id=checkpoint_id, process_group=process_group)
    model.load_state_dict(state["model"])
    model.fused_optimizer.load_state_dict(state["optim"])  # type: ignore[operator,union-attr]
    for key, value in (extra or {}).items():
        if hasattr(value, "load_state_dict"):
            value.load_state_dict(state[key])
    return state


__all__ = ["check", "load", "save", "state_dict"]
