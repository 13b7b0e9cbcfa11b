"""Our torchx Slurm scheduler (launch/slurm.py) without a cluster: it is the one torchx picks for
``slurm``, it reads both ``squeue --json`` layouts (Slurm 22.05's, recorded from the Debian
package, and 24.11's), and the components ask Slurm for the resources they were given."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from torchx.runner import get_runner
from torchx.schedulers import get_scheduler_factories
from torchx.schedulers import slurm_scheduler
from torchx.schedulers.slurm_scheduler import SlurmScheduler
from torchx.specs import AppState

from launch import components
from launch.slurm import AppSlurmScheduler, _torchrun_root_cause

ROOT = Path(__file__).resolve().parents[2]

# Slurm 22.05.8 (openapi v0.0.38), trimmed to the keys torchx reads: `-j` is ignored (every job
# comes back) and a pending job has no `job_resources`.
SQUEUE_22_05 = {"jobs": [
    {"job_id": 1, "name": "hostname", "job_state": "COMPLETED", "het_job_id": 0, "command": "hostname",
     "current_working_directory": "/work", "nodes": "vm",
     "job_resources": {"nodes": "vm", "allocated_nodes": [{"nodename": "vm", "cpus_used": 1,
                                                          "memory_allocated": 100}]}},
    {"job_id": 7, "name": "dlrm_adamar-0", "job_state": "PENDING", "het_job_id": 0, "command": "",
     "current_working_directory": "/work", "nodes": ""},
    {"job_id": 8, "name": "study_s2-0", "job_state": "RUNNING", "het_job_id": 0, "command": "",
     "current_working_directory": "/work", "nodes": "vm",
     "job_resources": {"nodes": "vm", "allocated_nodes": [{"nodename": "vm", "cpus_used": 2,
                                                          "memory_allocated": 8192}]}},
]}
# Slurm 24.11: job_state a list, het_job_id / job_id structured, nodes.allocation; a two-node job
# (two heterogeneous components) of which one has failed.
SQUEUE_24_11 = {"jobs": [
    {"job_id": 10, "name": "dlrm_adamar-0", "job_state": ["RUNNING"], "het_job_id": {"set": True, "number": 10},
     "command": "", "current_working_directory": "/work", "nodes": "n1",
     "job_resources": {"nodes": {"list": "n1", "allocation": [
         {"name": "n1", "cpus": {"used": 16}, "memory": {"allocated": 64000 * 1024}}]}}},
    {"job_id": 11, "name": "dlrm_adamar-1", "job_state": ["FAILED"], "het_job_id": {"set": True, "number": 10},
     "command": "", "current_working_directory": "/work", "nodes": "n2",
     "job_resources": {"nodes": {"list": "n2", "allocation": [
         {"name": "n2", "cpus": {"used": 16}, "memory": {"allocated": 64000 * 1024}}]}}},
    {"job_id": 12, "name": "other-0", "job_state": ["PENDING"], "het_job_id": {"set": False, "number": 0},
     "command": "", "current_working_directory": "/work", "nodes": "", "job_resources": None},
]}


@pytest.fixture
def squeue(monkeypatch):
    """Answers `squeue --json` with the given layout; `sacct` has no accounting, as on our local Slurm."""
    layout = {}

    def check_output(cmd, **kwargs):
        if cmd[0] == "squeue":
            return json.dumps(layout["jobs"])
        raise subprocess.CalledProcessError(1, cmd, stderr="Slurm accounting storage is disabled")

    monkeypatch.setattr(subprocess, "check_output", check_output)
    return layout


def test_torchx_runs_slurm_jobs_through_our_scheduler():
    assert isinstance(get_scheduler_factories()["slurm"]("test"), AppSlurmScheduler)


def test_slurm_22_05_pending_running_and_other_jobs(squeue):
    squeue["jobs"] = SQUEUE_22_05
    sched = AppSlurmScheduler("test")
    pending = sched.describe("7")  # torchx's own scheduler: KeyError 'job_resources'
    assert pending.state == AppState.PENDING and [r.name for r in pending.roles] == ["dlrm_adamar"]
    assert [(r.id, r.state) for r in pending.roles_statuses[0].replicas] == [(0, AppState.PENDING)]
    running = sched.describe("8")  # not the last job's state, nor job 1's
    assert running.state == AppState.RUNNING and running.roles[0].name == "study_s2"
    assert running.roles[0].resource.cpu == 2 and running.roles[0].resource.memMB == 8192
    assert running.roles_statuses[0].replicas[0].hostname == "vm"
    assert sched.describe("9") is None  # gone from squeue, no accounting


def test_slurm_24_11_heterogeneous_job_fails_when_one_node_fails(squeue):
    squeue["jobs"] = SQUEUE_24_11
    desc = AppSlurmScheduler("test").describe("10")
    assert desc.state == AppState.FAILED
    replicas = desc.roles_statuses[0].replicas
    assert [(r.id, r.hostname, r.state) for r in replicas] == [(0, "n1", AppState.RUNNING), (1, "n2", AppState.FAILED)]
    assert desc.roles[0].num_replicas == 2 and desc.roles[0].resource.cpu == 16
    assert AppSlurmScheduler("test").describe("12").state == AppState.PENDING


def test_root_cause_names_the_rank_and_its_error():
    text = ("[1]: Traceback ...\nRoot Cause (first observed failure):\n[0]:\n  time      : 2026\n"
            "  rank      : 1 (local_rank: 1)\n  exitcode  : 1 (pid: 3)\n  traceback : Traceback:\n"
            "    File x\n  DataError: day_0.tsv line 3, column 14: not an integer\n  \n=======\n")
    assert _torchrun_root_cause(text) == "rank 1 (local_rank: 1): DataError: day_0.tsv line 3, column 14: not an integer"
    assert _torchrun_root_cause("no summary") == ""


def _script(monkeypatch, tmp_path, *args: str, slurm_version=(22, 5)) -> str:
    monkeypatch.setattr(SlurmScheduler, "_partition_memmb", lambda self, partition: None)  # no sinfo call
    monkeypatch.setattr(slurm_scheduler, "version", lambda: slurm_version)  # torchx picks its GPU option by it
    monkeypatch.chdir(ROOT)
    with get_runner() as runner:
        info = runner.dryrun_component("launch/components.py:dlrm", list(args), "slurm",
                                       cfg={"log_dir": str(tmp_path / "logs")})
    return repr(info.request)


@pytest.mark.parametrize("slurm_version", [(22, 5), (24, 11)])
def test_the_job_asks_for_what_the_component_was_given(monkeypatch, tmp_path, slurm_version):
    script = _script(monkeypatch, tmp_path, "-j", "1x2", "--config", "configs/synthetic/adamar.yaml")
    # default: one CPU and 4 GiB per rank, no GPU, named after the run
    assert "#SBATCH --job-name=dlrm_adamar-0 " in script
    assert "--cpus-per-task=2 " in script and "--mem=8192 " in script and "gpu" not in script.split("set -evx")[0]
    assert "OMP_NUM_THREADS=1," in script
    # CPU ranks keep a step's temporaries on glibc's heap (kernels/host_memory.MALLOC_ENV)
    assert "MALLOC_MMAP_THRESHOLD_=33554432," in script and "MALLOC_TRIM_THRESHOLD_=4294967296" in script
    # the job's torchrun is the venv's, whatever PATH the submitting shell had
    assert f'export PATH={Path(sys.executable).parent}:"$PATH"' in script
    logs = tmp_path / "logs"
    assert f"--output={logs}/slurm-%j.out" in script
    assert f'--output={logs}/slurm-"$SLURM_JOB_ID"-dlrm_adamar-0.out' in script
    assert f'--error={logs}/slurm-"$SLURM_JOB_ID"-dlrm_adamar-0.err' in script

    script = _script(monkeypatch, tmp_path, "-j", "2x4", "--cpu", "16", "--memMB", "64000", "--gpu", "4",
                     "--out", "/shared/runs/adamar_1tb", slurm_version=slurm_version)
    head = script.split("set -evx")[0]
    for node in (0, 1):  # one heterogeneous component per node, each with the node's resources
        assert (f"--job-name=dlrm_adamar_1tb-{node} --requeue --ntasks-per-node=1 --cpus-per-task=16 --mem=64000 "
                f"--gres=gpu:4 ") in head
    assert "gpus-per-task" not in head and "gpus-per-node" not in head and "--ntasks=" not in head and "OMP_NUM_THREADS" not in script
    assert "MALLOC_" not in script  # GPU ranks: the allocator's defaults

    script = _script(monkeypatch, tmp_path, "-j", "1x2", "--cpu", "8")
    assert "--cpus-per-task=8 " in script and "OMP_NUM_THREADS=4," in script


@pytest.mark.parametrize("args, message", [
    (["-j", "1x4", "--gpu", "2"], "each of the 4 ranks on a node needs its own GPU"),
    (["--cpu", "-1"], "cannot be negative"),
])
def test_resources_that_cannot_fit_are_refused(args, message):
    kwargs = {"j": "1x2"}
    for flag, value in zip(args[::2], args[1::2]):
        kwargs[flag.lstrip("-")] = value if flag == "-j" else int(value)
    with pytest.raises(ValueError, match=message):
        components.dlrm(**kwargs)
