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

All or nothing. :func:`save` writes into ``<path>.tmp-<token>``, waits for every rank
(barrier), records every file's size and (by default) SHA-256 in ``manifest.json``,
then renames the folder to ``<path>`` (an existing ``<path>`` is first renamed aside
and removed only after the new one is in place). A process killed at any moment of a
save therefore never touches other checkpoints and leaves at ``<path>`` the old
checkpoint or the new one, never a mix (replacing one: in the instant between the two
renames ``<path>`` is absent and the old one waits, complete, at ``<path>.old-<token>``);
a folder without ``manifest.json`` is an unfinished save. :func:`load` (through :func:`check`) first verifies every file
against the manifest on every rank (sizes always: a ``stat`` per file; SHA-256 when
recorded, each rank hashing its share of the files), then checks the metadata against
the model, and only then reads a tensor; a problem raises one :class:`CheckpointError`
on every rank naming the checkpoint and the file or table. Checksums cost one read of
the checkpoint at save and at load (about 1 GB/s per rank with SHA-NI, the files
being hashed by all ranks in parallel); a multi-GB checkpoint once per epoch pays
seconds, the price of detecting same-size damage, which sizes cannot. ``save(...,
checksums=False)`` records sizes only. The files must be on a file system every rank
sees (as DCP's own ``FileSystemWriter`` requires).

Known limit (TorchRec's layout, FBGEMM's too): the per-row states of a column-wise
sharded table are saved as one row-wise copy per column shard (global length
rows x shards), so they load only into the same column split.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torchrec.distributed.types import ShardedTensor

from .kernel import OPTIMIZER_NAME_KEY, STEP_SLOT, drop_absent_epochs
from .state_names import checkpoint_view, stock_hint


MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot load into the model; the message names the checkpoint and the
    file, table or key. Raised on every rank, before any tensor of the model is touched."""


class CheckpointDamaged(CheckpointError):
    """The checkpoint's files are incomplete or damaged (unfinished save, truncated or altered
    file): an older checkpoint may still be good, a newer one will not fit better."""


def _sharded(model: nn.Module, what: str) -> Any:
    opt = getattr(model, "fused_optimizer", None)
    if opt is None:
        raise TypeError(
            f"checkpoint.{what} takes a model wrapped by TorchRec's DistributedModelParallel (it owns the fused "
            f"optimizer state of the tables); got {type(model).__name__}, which has no fused_optimizer. Shard it "
            f"first (DistributedModelParallel(model, sharders=torchrec_adaptive.distributed.sharders())), or save an "
            f"unsharded model's weights with torch.save(model.state_dict()).")
    return opt


def state_dict(model: nn.Module, extra: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """What :func:`save` writes: ``{"model": model.state_dict(), "optim": fused optimizer state}``,
    plus each ``extra`` entry: an object's ``state_dict()`` (a dense optimizer) or a plain dict."""
    state = {"model": model.state_dict(), "optim": _sharded(model, "state_dict").state_dict()}
    for key, value in (extra or {}).items():
        state[key] = value.state_dict() if hasattr(value, "state_dict") else value
    return state


# --- collectives that also work without a process group (one process) -----------------------

def _rank(pg: Optional[dist.ProcessGroup]) -> int:
    return dist.get_rank(pg) if dist.is_initialized() else 0


def _world(pg: Optional[dist.ProcessGroup]) -> int:
    return dist.get_world_size(pg) if dist.is_initialized() else 1


def _gather(obj: Any, pg: Optional[dist.ProcessGroup]) -> List[Any]:
    if not dist.is_initialized():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size(pg)
    dist.all_gather_object(out, obj, group=pg)
    return out


def _from_first(obj: Any, pg: Optional[dist.ProcessGroup]) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(pg, 0) if pg is not None else 0, group=pg)
    return box[0]


def _barrier(pg: Optional[dist.ProcessGroup]) -> None:
    if dist.is_initialized():
        dist.barrier(group=pg)


# --- integrity: the manifest --------------------------------------------------------------

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _describe(folder: Path, pg: Optional[dist.ProcessGroup], checksums: bool) -> Dict[str, Dict[str, Any]]:
    """Collective: size (and SHA-256) of every file in ``folder``, each rank hashing a share."""
    names = _from_first(sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
                        if _rank(pg) == 0 else None, pg)
    mine = {}
    for name in names[_rank(pg)::_world(pg)]:
        entry: Dict[str, Any] = {"size": (folder / name).stat().st_size}
        if checksums:
            entry["sha256"] = _sha256(folder / name)
        mine[name] = entry
    return {k: v for part in _gather(mine, pg) for k, v in part.items()}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(folder: Path, manifest: Dict[str, Any]) -> None:
    tmp = folder / f"{MANIFEST}.tmp"
    with tmp.open("w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


def _publish(tmp: Path, final: Path, token: str) -> None:
    """Rename the finished ``tmp`` to ``final``; an existing ``final`` is moved aside first and
    removed last, so a kill between the steps leaves the other checkpoints as they were."""
    old = final.with_name(f"{final.name}.old-{token}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def save(model: nn.Module, checkpoint_id: str, process_group: Optional[dist.ProcessGroup] = None,
         extra: Optional[Mapping[str, Any]] = None, *, checksums: bool = True,
         info: Optional[Mapping[str, Any]] = None) -> None:
    """Collective, atomic DCP save of the model's weights and fused optimizer state (incl. each
    table's step k), and of ``extra`` (see :func:`state_dict`), to the folder ``checkpoint_id``.

    ``checksums``: record each file's SHA-256 besides its size (see the module docstring for the
    cost). ``info``: a small JSON-able dict kept in the manifest (:func:`read_info`), e.g. which
    run and epoch wrote the checkpoint, readable without loading anything."""
    state = state_dict(model, extra)
    final = Path(checkpoint_id)
    token = _from_first(uuid.uuid4().hex[:12] if _rank(process_group) == 0 else None, process_group)
    tmp = final.with_name(f"{final.name}.tmp-{token}")
    dcp.save(state, checkpoint_id=str(tmp), process_group=process_group)
    _barrier(process_group)  # every rank's files and the coordinator's .metadata are written
    files = _describe(tmp, process_group, checksums)
    if _rank(process_group) == 0:
        _write_manifest(tmp, {"format": 1, "files": files, "info": dict(info or {})})
        _publish(tmp, final, token)
    _barrier(process_group)  # nobody returns before the checkpoint is in place


def read_info(checkpoint_id: str) -> Optional[Dict[str, Any]]:
    """The ``info`` a finished :func:`save` recorded, or None (no manifest: unfinished or not ours).
    Not collective; reads one small file."""
    try:
        return dict(json.loads((Path(checkpoint_id) / MANIFEST).read_text()).get("info", {}))
    except (OSError, ValueError):
        return None


_NO_MANIFEST = "is missing: the save did not finish"


def _integrity_problems(path: Path, pg: Optional[dist.ProcessGroup], checksums: bool) -> List[str]:
    """Collective: what is wrong with the files of ``path`` (same list on every rank)."""
    problems: List[str] = []
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        problems.append(f"{path / MANIFEST} {_NO_MANIFEST} (or the folder was not written by "
                        f"torchrec_adaptive.distributed.checkpoint.save; load(..., verify_files=False) skips this check)")
        files = {}
    except (OSError, ValueError, KeyError, TypeError) as e:
        problems.append(f"{path / MANIFEST} is unreadable: {e}")
        files = {}
    for name in sorted(files)[_rank(pg)::_world(pg)]:
        want, file = files[name], path / name
        try:
            size = file.stat().st_size
        except OSError:
            problems.append(f"{file}: missing")
            continue
        if size != want["size"]:
            problems.append(f"{file}: {size} bytes, the save wrote {want['size']}")
        elif checksums and "sha256" in want and _sha256(file) != want["sha256"]:
            problems.append(f"{file}: SHA-256 differs from the one recorded at save (the file was altered)")
    return sorted({p for ps in _gather(problems, pg) for p in ps})


def _damaged(path: Path, problems: List[str]) -> CheckpointDamaged:
    return CheckpointDamaged(f"checkpoint {str(path)!r} is incomplete or damaged; nothing was loaded:\n  "
                             + "\n  ".join(problems))


def verify(checkpoint_id: str, process_group: Optional[dist.ProcessGroup] = None, *,
           checksums: bool = True) -> None:
    """Collective: raise :class:`CheckpointDamaged` (every rank) unless every file the manifest
    lists is present with its recorded size and, when recorded and ``checksums``, its SHA-256.
    Reads no tensor; each rank checks a share of the files."""
    problems = _integrity_problems(Path(checkpoint_id), process_group, checksums)
    if problems:
        raise _damaged(Path(checkpoint_id), problems)


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


def _table_of_saved_key(key: str) -> str:
    """A checkpoint key under ``model.`` or ``optim.state.`` -> the table (or parameter) it belongs to."""
    rest = key.split(".", 2)[2] if key.startswith("optim.state.") else key[len("model."):]
    if ".weight." in rest + ".":
        return _param_table(rest[: (rest + ".").index(".weight.") + len(".weight")])
    return rest


def check(model: nn.Module, checkpoint_id: str, process_group: Optional[dist.ProcessGroup] = None,
          state: Optional[Dict[str, Any]] = None, *, verify_files: bool = True, checksums: bool = True,
          strict: bool = True, from_stock: bool = False) -> Dict[str, Any]:
    """Raise :class:`CheckpointError` (a ``ValueError``, on every rank) if the checkpoint cannot
    load into ``model`` as a whole: damaged or unfinished files (:func:`verify`, unless
    ``verify_files=False``), a key of the model missing from the checkpoint, another global shape or
    optimizer, or (``strict``) a table of the checkpoint that the model lacks, which a load
    would drop without a word. Slots saved under their previous names are read from those;
    ``from_stock``: tables of a stock TorchRec checkpoint need not hold our step k, s_r and c_r
    (``state_names.py``).

    Collective. Returns the model's state dict (views of its tensors), ready for ``dcp.load``.
    """
    state = state if state is not None else state_dict(model)
    integrity = _integrity_problems(Path(checkpoint_id), process_group, checksums) if verify_files else []
    if any(_NO_MANIFEST not in p for p in integrity):
        raise _damaged(Path(checkpoint_id), integrity)
    # Without a manifest the metadata is still compared below, so the error says all that is wrong.
    try:
        metadata = dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata
    except Exception as e:  # a .metadata from elsewhere, or damaged where no manifest vouched for it
        raise CheckpointDamaged(f"checkpoint {checkpoint_id!r}: cannot read {Path(checkpoint_id) / '.metadata'}: "
                                f"{e}") from None
    state = drop_absent_epochs(state, metadata)  # older checkpoints have no epoch: the model keeps its own
    view = checkpoint_view(state, metadata, from_stock=from_stock)  # the keys the checkpoint holds them under
    flat = _flatten(view, "", {})
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
    if strict:
        # A rank holds optimizer state only for tables with a shard there: compare with every rank's keys.
        ours = sorted(k for k in flat if k.startswith(("model.", "optim.state.")))
        known = {k for ks in _gather(ours, process_group) for k in ks}
        extra_tables = sorted({_table_of_saved_key(k) for k in metadata
                               if k.startswith(("model.", "optim.state.")) and k not in known})
        for t in extra_tables:
            problems.append(f"table {t!r} is in the checkpoint but not in the model: loading would drop it "
                            f"(load(..., strict=False) does so on purpose)")
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
                        f"(it holds {held or 'no optimizer state'} for this table){stock_hint(slot, held)}")
    ours = {k: v for k, v in _our_optimizers(view).items() if k in metadata}
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
    if integrity:
        raise _damaged(Path(checkpoint_id), integrity + problems)
    if problems:
        raise CheckpointError(f"checkpoint {checkpoint_id!r} does not fit the model; nothing was loaded:\n  "
                              + "\n  ".join(problems))
    return state


def load(model: nn.Module, checkpoint_id: str, process_group: Optional[dist.ProcessGroup] = None,
         extra: Optional[Mapping[str, Any]] = None, *, verify_files: bool = True, checksums: bool = True,
         strict: bool = True, from_stock: bool = False) -> Dict[str, Any]:
    """Collective: :func:`check` (files against the manifest, then keys, shapes and optimizers,
    ``extra`` included), then load weights and fused optimizer state (any plan, any world size)
    and ``extra``: objects get ``load_state_dict``, plain dicts are filled in place. Returns what
    was loaded. DCP loads in place, so an ``extra`` object's state must already exist (a torch
    optimizer: ``KeyedOptimizer.init_state()`` first). ``verify_files=False`` loads a folder
    written by plain ``dcp.save`` (no manifest). ``from_stock``: the checkpoint was written by stock
    TorchRec (FBGEMM's fused optimizer, e.g. ``EXACT_ROWWISE_ADAGRAD``): its FBGEMM-named state loads
    and each such table keeps this model's step k, s_r and c_r (``state_names.py``)."""
    state = check(model, checkpoint_id, process_group, state=state_dict(model, extra), verify_files=verify_files,
                  checksums=checksums, strict=strict, from_stock=from_stock)
    view = checkpoint_view(state, dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata,
                           from_stock=from_stock)
    try:
        # check() found every key of ``state`` in the checkpoint (the epoch of an older one was dropped)
        dcp.load(view, checkpoint_id=checkpoint_id, process_group=process_group)
    except (Exception, dcp.CheckpointException) as e:  # CheckpointException is a BaseException
        raise CheckpointDamaged(
            f"checkpoint {checkpoint_id!r}: reading failed although its files matched the manifest "
            f"({'sizes only' if not checksums else 'sizes and recorded checksums'}): {e}\nThe model's tensors may "
            f"be partly overwritten: load another checkpoint (a successful load rewrites every key) or rebuild "
            f"the model.") from None
    model.load_state_dict(state["model"])
    _sharded(model, "load").load_state_dict(state["optim"])
    for key, value in (extra or {}).items():
        if hasattr(value, "load_state_dict"):
            value.load_state_dict(state[key])
    return state


__all__ = ["CheckpointDamaged", "CheckpointError", "MANIFEST", "check", "load", "read_info", "save", "state_dict",
           "verify"]
