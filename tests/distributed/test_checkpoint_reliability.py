"""Checkpoints are all or nothing (issue 12, findings 4 and 6).

* A truncated shard file, or one altered at the same size, is refused before any tensor of
  the model is touched, with the checkpoint and the file named, on both ranks (before: DCP's
  ``CheckpointException ... failed reading zip archive`` after overwriting some keys).
* A checkpoint holding a table the model lacks is refused (before: dropped without a word);
  ``strict=False`` drops it on purpose.
* ``save`` of an unsharded model says what it needs (before: ``AttributeError: fused_optimizer``).
* A save killed at any of its steps (faults injected at each step; and real SIGKILLs at
  random moments of a process saving in a loop) leaves every earlier checkpoint loadable
  and exact, and the killed one either absent/refused or complete.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
import torch.distributed as dist
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.distributed.model_parallel import DistributedModelParallel

from .harness import (TABLES, Wrapper, _local_shards, _train_steps, make_ebc, per_param_sharding, run_ranks,
                      shard_with_plan)

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]


def _build(tables: Any = None) -> DistributedModelParallel:
    import torchrec_adaptive as ta

    if tables is None:
        ebc = make_ebc()
    else:
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=n, num_embeddings=r, embedding_dim=d,
                                                                feature_names=f) for n, r, d, f in tables])
    apply_optimizer_in_backward(ta.AdamAR, ebc.embedding_bags.parameters(), {"lr": 0.05, "alpha": 1e-2})
    names = {n for n, *_ in (tables or TABLES)}
    per_param = {k: v for k, v in per_param_sharding("row_wise").items() if k in names}
    return shard_with_plan(Wrapper(ebc), ebc, per_param)


def _same(a: Dict[str, List[torch.Tensor]], b: Dict[str, List[torch.Tensor]]) -> bool:
    return set(a) == set(b) and all(torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def _expect(exc: type, fn: Any, *needles: str) -> str:
    try:
        fn()
    except exc as e:
        for n in needles:
            assert n in str(e), f"{n!r} not in: {e}"
        return str(e)
    raise AssertionError(f"no {exc.__name__} raised")


def damage_worker(rank: int, path: str) -> Dict[str, Any]:
    from torchrec_adaptive.distributed import checkpoint
    from torchrec_adaptive.distributed.checkpoint import CheckpointDamaged, CheckpointError

    a = _build()
    _train_steps(a, rank, 3)
    good = f"{path}/good"
    checkpoint.save(a, good)
    saved = _local_shards(a)
    checkpoint.save(a, good)  # saving over a finished checkpoint replaces it whole
    leftovers = [p for p in os.listdir(path) if p.startswith("good") and p != "good"]
    assert not leftovers, leftovers  # no temporary or moved-aside folder is left behind

    # Truncated shard: refused on every rank, file named, nothing of the model touched.
    for name, damage in (("truncated", lambda f: f.write_bytes(f.read_bytes()[:-100])),
                         ("altered", lambda f: f.write_bytes(bytes([f.read_bytes()[0] ^ 1]) + f.read_bytes()[1:]))):
        target = f"{path}/{name}"
        checkpoint.save(a, target)
        if rank == 0:
            damage(Path(target) / "__1_0.distcp")
        dist.barrier()
        fresh = _build()
        before = _local_shards(fresh)
        _expect(CheckpointDamaged, lambda: checkpoint.load(fresh, target), target, "__1_0.distcp",
                "nothing was loaded")
        assert _same(before, _local_shards(fresh)), f"{name}: the model changed although the load was refused"
    # Sizes only: the same-size alteration passes verification and is caught while reading, or not
    # at all; with checksums (the default) it is caught before.
    checkpoint.load(_build(), good, checksums=False)

    # A checkpoint table the model lacks: refused, unless strict=False.
    small = _build(TABLES[:2])
    before = _local_shards(small)
    _expect(CheckpointError, lambda: checkpoint.load(small, good),
            "table 't2' is in the checkpoint but not in the model")
    assert _same(before, _local_shards(small))
    checkpoint.load(small, good, strict=False)
    after = _local_shards(small)
    for k in after:
        for x, y in zip(after[k], saved[k]):
            assert torch.equal(x, y), k

    # An unsharded model: a clear error, nothing written.
    _expect(TypeError, lambda: checkpoint.save(make_ebc(), f"{path}/unsharded"), "DistributedModelParallel",
            "fused_optimizer")
    assert not any("unsharded" in p for p in os.listdir(path))

    # The good checkpoint still loads exactly.
    b = _build()
    checkpoint.load(b, good)
    assert _same(saved, _local_shards(b))
    return {"ok": True}


def test_damaged_checkpoints_are_refused_before_any_tensor_is_touched(tmp_path: Path) -> None:
    run_ranks(damage_worker, str(tmp_path), timeout=240)


class _Killed(BaseException):
    """Stands for a SIGKILL at that point: save has no cleanup (no finally) that would run."""


def _fault(where: str) -> Any:
    """A context that makes the next save stop at ``where``."""
    from unittest import mock

    from torchrec_adaptive.distributed import checkpoint as ck

    def boom(*_: Any, **__: Any) -> None:
        raise _Killed(where)

    if where == "writing shards":  # DCP wrote some files, not .metadata
        real = ck.dcp.save

        def partial(state: Any, checkpoint_id: str, **kw: Any) -> None:
            real(state, checkpoint_id=checkpoint_id, **kw)
            os.remove(Path(checkpoint_id) / ".metadata")
            raise _Killed(where)
        return mock.patch.object(ck.dcp, "save", partial)
    if where == "before the manifest":
        return mock.patch.object(ck, "_write_manifest", boom)
    if where == "manifest half written":
        def half(folder: Path, manifest: Any) -> None:
            (folder / ck.MANIFEST).write_text('{"files": {".metad')
            raise _Killed(where)
        return mock.patch.object(ck, "_write_manifest", half)
    if where == "before the rename":
        return mock.patch.object(ck, "_publish", boom)
    if where == "between the renames":  # overwriting: the old folder moved aside, the new one not yet in place
        real_replace = os.replace

        def publish(src: Any, dst: Any) -> None:
            if ".tmp-" in Path(src).name:  # the new folder's rename, after the old one was moved aside
                raise _Killed(where)
            real_replace(src, dst)
        return mock.patch.object(ck.os, "replace", publish)
    if where == "before removing the old folder":
        return mock.patch.object(ck.shutil, "rmtree", boom)
    raise ValueError(where)


PHASES = ["writing shards", "before the manifest", "manifest half written", "before the rename",
          "between the renames", "before removing the old folder"]


def kill_phases_worker(rank: int, path: str) -> Dict[str, Any]:
    from torchrec_adaptive.distributed import checkpoint
    from torchrec_adaptive.distributed.checkpoint import CheckpointDamaged

    a = _build()
    _train_steps(a, rank, 2)
    checkpoint.save(a, f"{path}/epoch_1")
    first = _local_shards(a)
    outcome = {}
    for i, phase in enumerate(PHASES):
        _train_steps(a, rank, 1)
        # The app's pattern: a new folder per epoch; "between the renames" needs a folder to replace.
        target = f"{path}/copy" if phase == "between the renames" else f"{path}/epoch_{i + 2}"
        if phase == "between the renames":
            checkpoint.save(a, target)
        with _fault(phase):
            try:
                checkpoint.save(a, target)
                raise AssertionError(f"{phase}: the fault did not fire")
            except _Killed:
                pass
        now = _local_shards(a)
        b = _build()
        # Every earlier checkpoint loads exactly.
        checkpoint.load(b, f"{path}/epoch_1")
        assert _same(first, _local_shards(b)), phase
        if phase == "between the renames":  # the replaced folder waits, complete, under <name>.old-<token>
            assert not Path(target).exists() and list(Path(path).glob("copy.old-*")), os.listdir(path)
        # The killed save: refused (or absent), or complete and equal to the state it saved.
        if Path(target).exists():
            try:
                checkpoint.load(b, target)
                assert _same(now, _local_shards(b)), f"{phase}: the killed save loads but differs"
                outcome[phase] = "complete"
            except CheckpointDamaged as e:
                assert target in str(e), str(e)
                outcome[phase] = "refused"
        else:
            outcome[phase] = "absent"
    return outcome


def test_a_save_killed_at_any_step_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    out = run_ranks(kill_phases_worker, str(tmp_path), world=1, timeout=240)[0]
    assert out == {"writing shards": "absent", "before the manifest": "absent", "manifest half written": "absent",
                   "before the rename": "absent", "between the renames": "absent",
                   "before removing the old folder": "complete"}, out


SAVER = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from tests.distributed.test_checkpoint_reliability import _build
from tests.distributed.harness import _local_shards, _train_steps
from torchrec_adaptive.distributed import checkpoint
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str({port}))
dist.init_process_group("gloo", rank=0, world_size=1)
a = _build()
for e in range(1, 10_000):
    _train_steps(a, 0, 1)
    checkpoint.save(a, f"{path}/epoch_{{e}}")
    # the reference is published by a rename, so a kill while it is written leaves none (not a torn one)
    torch.save(_local_shards(a), f"{path}/expected_{{e}}.pt.tmp")
    os.replace(f"{path}/expected_{{e}}.pt.tmp", f"{path}/expected_{{e}}.pt")
"""


def verify_kills_worker(rank: int, path: str) -> Dict[str, Any]:
    from torchrec_adaptive.distributed import checkpoint

    loaded = 0
    b = _build()  # a successful load rewrites every key: one model serves every folder
    for p in sorted(Path(path).glob("epoch_*")):
        if not p.name[6:].isdigit():
            continue  # a save's temporary folder: never a checkpoint
        expected = Path(path) / f"expected_{p.name[6:]}.pt"
        checkpoint.load(b, str(p))  # every finished folder loads...
        if expected.exists():  # ... and equals what was saved (the last one may lack its reference)
            assert _same(torch.load(expected), _local_shards(b)), p
        loaded += 1
    return {"loaded": loaded}


def test_sigkill_at_random_moments_of_saving(tmp_path: Path) -> None:
    from .harness import free_port

    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for trial in range(1):  # each trial costs ~25 s here; the step-by-step faults above cover every step
        path = tmp_path / str(trial)
        path.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", SAVER.format(root=str(ROOT), port=free_port(), path=path)],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.time() + 180
            while not (path / "expected_2.pt").exists():
                assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
                assert time.time() < deadline, "the saver made no progress"
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 0.5))  # somewhere in a later save (each takes ~0.1-0.5 s here)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        got = run_ranks(verify_kills_worker, str(path), world=1, timeout=240)[0]
        assert got["loaded"] >= 2, got
