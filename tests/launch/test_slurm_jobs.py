"""The torchx components on a real Slurm (the one-node cluster of scripts/slurm_local.sh, Slurm
22.05 from Debian): the recipe of docs/app.md, exactly as a user runs it.

A 1-epoch dlrm on 1x2 succeeds and writes its metrics; a failing config fails, with the failing
rank and its error in ``torchx status`` and ``torchx log``; a study queued behind another job is
followed through ``torchx status`` from PENDING to SUCCEEDED. torchx is called as
``.venv/bin/torchx`` with the venv *not* on PATH: the job must still run the venv's torchrun.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = """
data:
  synthetic: {num_fields: 6, max_vocab: 2000, train_rows: 6000, test_rows: 2000}
train: {epochs: 1, batch_size: 128, eval_batch_size: 1024, freq_buckets: [1, 10, 100]}
"""

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != BIN)
    return {**os.environ, "PATH": path}


def _torchx(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "torchx"), *args], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    proc.text = proc.stdout + proc.stderr  # type: ignore[attr-defined]
    return proc


def _handle(proc: subprocess.CompletedProcess) -> str:
    found = re.findall(r"^(slurm://\S+/\d+)$", proc.stdout, re.MULTILINE)
    assert found, proc.text[-3000:]
    return found[0]


def _state(handle: str) -> str:
    proc = _torchx("status", handle, timeout=60)
    assert proc.returncode == 0, proc.text[-2000:]
    return re.search(r"State: (\w+)", proc.text).group(1)


def _job(handle: str) -> str:
    return subprocess.run(["scontrol", "show", "job", "-o", handle.rpartition("/")[2]], capture_output=True,
                          text=True, check=True).stdout


def _config(tmp: Path, name: str, base: str, extra: str = TINY) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(f"base: [{ROOT}/configs/{base}.yaml]\nname: {name}\n{extra}")
    return p


def test_starting_the_running_cluster_again_changes_nothing():
    script = ROOT / "scripts" / "slurm_local.sh"
    before = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    proc = subprocess.run(["bash", str(script), "start"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "started" not in proc.stderr, proc.stderr
    assert subprocess.run(["bash", str(script), "status"]).returncode == 0
    after = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True).stdout
    assert re.findall(r"BOOT_TIME\s*=.*", before) == re.findall(r"BOOT_TIME\s*=.*", after)


def test_dlrm_one_epoch_succeeds_with_its_metrics_and_resources(tmp_path):
    cfg = _config(tmp_path, "adamar", "synthetic/adamar")
    proc = _torchx("run", "-s", "slurm", "--wait", "launch/components.py:dlrm", "-j", "1x2",
                   "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert proc.returncode == 0 and "job finished: SUCCEEDED" in proc.text, proc.text[-4000:]
    handle = _handle(proc)
    assert _state(handle) == "SUCCEEDED"
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [1]
    assert 0.0 < recs[0]["test_auc"] < 1.0 and math.isfinite(recs[0]["train_loss"]) and recs[0]["test_rows"] == 2000
    # what Slurm was asked for and gave: one node, 2 CPUs and 8 GiB for its 2 ranks, named after the run
    job = _job(handle)
    assert "JobName=dlrm_run-0 " in job and "NumNodes=1 " in job and "NumCPUs=2 " in job, job
    assert "mem=8G" in job and "JobState=COMPLETED" in job, job
    # the logs are where docs/app.md says, and torchx log reads them
    app_id = handle.rpartition("/")[2]
    assert "epoch 1: train loss" in (ROOT / "runs" / "torchx" / f"slurm-{app_id}-dlrm_run-0.out").read_text()
    log = _torchx("log", "--streams", "stdout", handle, timeout=60)
    assert log.returncode == 0 and "epoch 1: train loss" in log.text, log.text[-2000:]


def test_a_failing_config_fails_with_the_rank_and_its_error(tmp_path):
    cfg = _config(tmp_path, "broken", "criteo/adam", f"data: {{train: {tmp_path}/no_such_day.tsv}}\n")
    proc = _torchx("run", "-s", "slurm", "--wait", "launch/components.py:dlrm", "--config", str(cfg),
                   "--out", str(tmp_path / "out"))
    assert proc.returncode != 0 and "FAILED" in proc.text, proc.text[-4000:]
    handle = _handle(proc)
    status = _torchx("status", handle, timeout=60).text
    assert "State: FAILED" in status, status
    msg = re.search(r"Msg: (.*)", status).group(1)
    assert re.search(r"dlrm_out/0: rank \d \(local_rank: \d\): \S*DataError: data file not found: .*no_such_day\.tsv", msg), status
    log = _torchx("log", handle, timeout=60).text
    assert "Root Cause (first observed failure)" in log and "no_such_day.tsv" in log, log[-3000:]
    assert "JobState=FAILED" in _job(handle)


def test_a_study_queued_behind_another_job_is_followed_to_success(tmp_path):
    # a job holding both CPUs until released, so the study is PENDING when submitted (where torchx's
    # own scheduler crashed on Slurm 22.05: no `job_resources` yet)
    release = tmp_path / "release"
    blocker = subprocess.run(["sbatch", "--parsable", "--job-name=blocker", "--cpus-per-task=2", "--mem=100",
                              f"--output={tmp_path}/blocker.out", "--wrap",
                              f"timeout 300 bash -c 'until [ -e {release} ]; do sleep 0.2; done'"],
                             capture_output=True, text=True, check=True).stdout.strip()
    try:
        cfgs = ",".join(str(_config(tmp_path, m, f"synthetic/{m}")) for m in ("adam", "adamar"))
        proc = _torchx("run", "-s", "slurm", "launch/components.py:study", "--configs", cfgs,
                       "--out", str(tmp_path / "study"))
        assert proc.returncode == 0, proc.text[-4000:]
        handle = _handle(proc)
        seen = [_state(handle)]
        assert seen == ["PENDING"], (seen, subprocess.run(["squeue"], capture_output=True, text=True).stdout)
    finally:
        release.touch()
    deadline = time.time() + 600
    while seen[-1] not in ("SUCCEEDED", "FAILED", "CANCELLED", "UNKNOWN"):
        assert time.time() < deadline, seen
        time.sleep(2)
        state = _state(handle)
        if state != seen[-1]:
            seen.append(state)
    assert seen == ["PENDING", "RUNNING", "SUCCEEDED"], seen
    assert "JobState=COMPLETED" in _job(f"slurm://x/{blocker}")
    summary = (tmp_path / "study" / "summary.md").read_text()
    assert "| adam |" in summary and "| adamar |" in summary
    assert (tmp_path / "study" / "auc_by_epoch.png").stat().st_size > 10_000
