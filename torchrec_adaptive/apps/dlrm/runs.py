"""A run folder's identity, so that runs never mix.

``<out>/config.json`` records the run: a random ``run_id`` drawn when the run starts, the
``config_hash`` of what it trains, the config itself and a ``history`` of starts and
resumes (with every config value a resume changed). Each checkpoint's manifest carries
the ``run_id`` and epoch that wrote it (``distributed.checkpoint.save(..., info=...)``),
so ``--resume`` only ever loads checkpoints of the run that ``config.json`` names.

A fresh run (no ``--resume``) moves an earlier run's files (config, metrics,
diagnostics, checkpoints) aside to ``<out>/previous/<time>-<run id>/`` and starts with a
new ``run_id``: nothing of the old run can be resumed into it by mistake, and nothing is
deleted. ``--resume`` refuses a changed config (the hash differs) unless asked
(``--allow-config-change``), and says so when there is nothing to resume.

``train.epochs`` is left out of the hash: resuming a finished run with more epochs is
what ``--resume`` is for (no schedule in the app depends on the total; the change is
still recorded in the history).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
PREVIOUS = "previous"
RUN_FILES = (CONFIG_FILE, "metrics.jsonl", "diagnostics.jsonl", CHECKPOINTS)
NOT_HASHED = ("train.epochs",)


class RunError(RuntimeError):
    """A run folder that cannot be started or resumed as asked; the message says why and what to do."""


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def config_hash(config: dict[str, Any]) -> str:
    """SHA-256 (16 hex digits) of the config without :data:`NOT_HASHED` keys."""
    kept = {k: v for k, v in _flat(config).items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """Dotted key -> [old value, new value] for every value that differs (absent: None)."""
    a, b = _flat(old), _flat(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class RunRecord:
    """What ``config.json`` holds."""

    run_id: str
    config_hash: str
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)

    def write(self, out: Path) -> None:
        tmp = out / f"{CONFIG_FILE}.tmp"
        tmp.write_text(json.dumps(self.__dict__, indent=1))
        os.replace(tmp, out / CONFIG_FILE)  # never half a config.json

    @classmethod
    def read(cls, out: Path) -> Optional["RunRecord"]:
        """The record, None if there is none; a config.json without a run id raises (an older app's)."""
        try:
            raw = json.loads((out / CONFIG_FILE).read_text())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise RunError(f"{out / CONFIG_FILE} is not valid JSON ({e}): cannot tell which run {out} holds") from None
        if not isinstance(raw, dict) or "run_id" not in raw:
            raise RunError(f"{out} was written by an older version of the app ({CONFIG_FILE} has no run_id): its "
                           f"checkpoints cannot be told apart from another run's. Run without --resume to start "
                           f"over (the old files are moved to {out / PREVIOUS}/).")
        return cls(run_id=raw["run_id"], config_hash=raw["config_hash"], config=raw["config"],
                   history=list(raw.get("history", [])))


def new_record(config: dict[str, Any]) -> RunRecord:
    h = config_hash(config)
    return RunRecord(run_id=uuid.uuid4().hex[:12], config_hash=h, config=config,
                     history=[{"event": "start", "time": _now(), "config_hash": h}])


def move_aside(out: Path) -> Optional[Path]:
    """Move an earlier run's files to ``<out>/previous/<time>-<run id>``; returns where, or None."""
    present = [out / n for n in RUN_FILES if (out / n).exists()]
    if not present:
        return None
    try:
        old = RunRecord.read(out)
        tag = old.run_id if old else "unknown"
    except RunError:
        tag = "unknown"
    dest = out / PREVIOUS / f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{tag}"
    dest.mkdir(parents=True)
    for p in present:
        os.replace(p, dest / p.name)
    return dest


def remove_unfinished_saves(out: Path) -> list[Path]:
    """Folders a killed save left (``epoch_<e>.tmp-*``, ``epoch_<e>.old-*``); never a finished checkpoint."""
    gone = []
    for p in sorted((out / CHECKPOINTS).glob("epoch_*.*-*")):
        if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def checkpoints_of(out: Path, run_id: str) -> tuple[list[tuple[int, Path]], list[str]]:
    """This run's finished checkpoints, newest first, and a note for each folder left out."""
    from ...distributed.checkpoint import read_info

    mine, skipped = [], []
    for p in (out / CHECKPOINTS).glob("epoch_*"):
        if not p.name[6:].isdigit():
            continue
        info = read_info(str(p))
        if info is None:
            skipped.append(f"{p}: no manifest (an unfinished save, or written before manifests)")
        elif info.get("run_id") != run_id:
            skipped.append(f"{p}: written by run {info.get('run_id')!r}, not {run_id!r}")
        elif info.get("epoch") != int(p.name[6:]):
            skipped.append(f"{p}: its manifest says epoch {info.get('epoch')!r}")
        else:
            mine.append((int(p.name[6:]), p))
    return sorted(mine, reverse=True), skipped


@dataclass
class Plan:
    """Rank 0's decision, sent to every rank."""

    record: RunRecord
    candidates: list[tuple[int, Path]] = field(default_factory=list)  # newest first; empty: fresh start
    changes: dict[str, list[Any]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)


def plan_run(out: Path, config: dict[str, Any], *, resume: bool, allow_config_change: bool = False,
             missing_ok: bool = False) -> Plan:
    """Decide (on rank 0, before any collective load) whether ``out`` starts fresh or resumes, and from what.

    ``missing_ok`` (the study's ``--resume``): a run with nothing to resume starts fresh, with a
    message, instead of failing."""
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        record = RunRecord.read(out)
        if record is None:
            why = f"nothing to resume in {out}: it holds no run ({CONFIG_FILE} is missing). Check --out"
            if not missing_ok:
                raise RunError(why + ", or run without --resume to start one.")
            return _fresh(out, config, [why + "; starting a new run."])
        changes = config_changes(record.config, config)
        hashed = {k: v for k, v in changes.items() if k not in NOT_HASHED}
        if hashed and not allow_config_change:
            lines = "\n  ".join(f"{k}: {a!r} -> {b!r}" for k, [a, b] in hashed.items())
            raise RunError(f"--resume: the config differs from the one run {record.run_id} in {out} trained "
                           f"with:\n  {lines}\nResume with the old values, or pass --allow-config-change to go on "
                           f"with the new ones (recorded in {CONFIG_FILE}'s history and in every metrics line's "
                           f"config_hash), or run without --resume to start a new run.")
        messages = [f"removed an unfinished save: {p}" for p in remove_unfinished_saves(out)]
        candidates, skipped = checkpoints_of(out, record.run_id)
        messages += [f"ignored {s}" for s in skipped]
        if not candidates:
            why = (f"nothing to resume in {out}: no finished checkpoint of run {record.run_id} (it stopped before "
                   f"its first checkpoint, or train.checkpoint is false)")
            if not missing_ok:
                raise RunError(why + ". Run without --resume to start it over.")
            return _fresh(out, config, messages + [why + "; starting a new run."])
        return Plan(record=record, candidates=candidates, changes=changes, messages=messages)
    return _fresh(out, config, [])


def _fresh(out: Path, config: dict[str, Any], messages: list[str]) -> Plan:
    moved = move_aside(out)
    if moved is not None:
        messages.append(f"an earlier run's files were moved to {moved} (a new run starts; --resume continues "
                        f"the run in {out})")
    record = new_record(config)
    record.write(out)
    return Plan(record=record, messages=messages)


def record_resume(out: Path, plan: Plan, epoch: int, config: dict[str, Any]) -> None:
    """After a successful load: the resume (and any config change) goes into the history."""
    rec = plan.record
    event: dict[str, Any] = {"event": "resume", "time": _now(), "from_epoch": epoch, "config_hash": config_hash(config)}
    if plan.changes:
        event["changes"] = plan.changes
    rec.history.append(event)
    rec.config, rec.config_hash = config, config_hash(config)
    rec.write(out)
