"""torchx's Slurm scheduler, made to work on Slurm 22.05 and to write its logs under ``runs/torchx``.

Registered as ``slurm`` under torchx's ``torchx.schedulers`` entry point (pyproject.toml), so
``torchx run -s slurm``, ``torchx status slurm://...`` and ``torchx log`` use it in place of the
built-in one. It subclasses torchx's :class:`SlurmScheduler` and changes only what torchx-nightly
2026.10.26 gets wrong on the Slurm 22.05 that Debian ships (found on a real one-node cluster,
``scripts/slurm_local.sh``):

* **describe**: Slurm 22.05's ``squeue --json`` (data_parser v0.0.38) ignores ``-j`` and returns
  *every* job, and a pending job has no ``job_resources`` key. torchx indexes
  ``job["job_resources"]`` (``KeyError`` right after submission, so ``torchx run --wait`` crashes)
  and would take the state of whichever job comes last. Here the jobs are filtered to the asked
  ID (or its heterogeneous-job components) and both layouts are read, through torchx's own
  per-layout helpers. The app's state is the most telling of its components' states.
* **the job's PATH**: the replicas run ``torchrun``; the batch script puts the ``bin`` of the
  virtualenv torchx runs from first on PATH, so the job uses that venv's torchrun and packages
  whatever PATH the submitting shell had.
* **logs**: with the ``log_dir`` run option (``.torchxconfig`` sets ``runs/torchx``) the batch
  script's and every replica's stdout/stderr go to ``<log_dir>/slurm-<jobid>[-<role>-<k>].{out,err}``
  instead of the submit directory, and the directory is recorded in torchx's own job-dir table so
  ``torchx log`` finds them.
* **GPUs**: ``--gres=gpu:N`` per node, which every Slurm version and both select plugins accept,
  instead of torchx's version-dependent ``--gpus-per-task`` (+ ``--ntasks=1``) / ``--gpus-per-node``.

Submission, the sbatch script and everything else are torchx's.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from subprocess import PIPE
from typing import Any

from torchx.schedulers.api import DescribeAppResponse, Scheduler
from torchx.schedulers.slurm_scheduler import (
    SlurmBatchRequest,
    SlurmOpts,
    SlurmScheduler,
    _get_job_dirs,
    _save_job_dir,
    get_appstate_from_job,
)
from torchx.specs import NONE, AppDef, AppDryRunInfo, AppState, ReplicaStatus, Role, RoleStatus, runopts


@dataclass
class AppSlurmOpts(SlurmOpts):
    """torchx's Slurm options plus where the logs go."""

    log_dir: str | None = None
    """Directory for the batch script's and the replicas' stdout/stderr (``slurm-<jobid>-<role>-<k>.out``);
    default: the submit directory, as torchx does. Ignored when ``job_dir`` is set (logs go there)."""

    @classmethod
    def get_docstrings(cls) -> dict[str, str]:
        # torchx reads the help texts from the class's own source: keep the inherited options' texts
        return {**SlurmOpts.get_docstrings(), **super().get_docstrings()}


# The state an app shows when its (heterogeneous-job) components disagree: a failure anywhere is the
# app's failure, then anything still to run; SUCCEEDED only when every component succeeded.
_STATE_RANK = {s: i for i, s in enumerate([AppState.FAILED, AppState.CANCELLED, AppState.UNKNOWN, AppState.RUNNING,
                                           AppState.PENDING, AppState.SUCCEEDED])}


def _het_leader(job: dict[str, Any]) -> int | None:
    """The heterogeneous-job leader's ID: an int in Slurm 22.05 (0: not heterogeneous),
    ``{"set": bool, "number": int}`` in 24.11."""
    het = job.get("het_job_id")
    if isinstance(het, dict):
        return int(het["number"]) if het.get("set") else None
    return int(het) if het else None


def _job_id(job: dict[str, Any]) -> int:
    jid = job["job_id"]
    return int(jid["number"]) if isinstance(jid, dict) else int(jid)


@dataclass(repr=False)  # torchx's __repr__ prints the sbatch command and script (--dryrun)
class _BatchRequest(SlurmBatchRequest):
    """torchx's batch request, whose script first puts the submitting venv's ``bin`` on PATH."""

    path_prefix: str | None = None

    def materialize(self) -> str:
        script = super().materialize()
        if not self.path_prefix:
            return script
        # after torchx's `set -evx` line: the replicas' `torchrun` must be the venv's
        head, sep, tail = script.partition("set -evx\n")
        assert sep, "torchx's sbatch script changed: no 'set -evx' line to put the PATH after"
        return f'{head}{sep}\nexport PATH={shlex.quote(self.path_prefix)}:"$PATH"\n{tail}'


class AppSlurmScheduler(SlurmScheduler, Scheduler[AppSlurmOpts]):
    """torchx's :class:`SlurmScheduler` that describes jobs on Slurm 22.05 as well as on newer
    versions, runs the replicas from the submitting venv and writes logs to ``log_dir``."""

    def _run_opts(self) -> runopts:
        return AppSlurmOpts.as_runopts()

    def _submit_dryrun(self, app: AppDef, cfg: AppSlurmOpts) -> AppDryRunInfo[SlurmBatchRequest, AppSlurmOpts]:
        info = super()._submit_dryrun(app, cfg)
        in_venv = sys.prefix != sys.base_prefix
        req = _BatchRequest(**vars(info.request), path_prefix=os.path.dirname(sys.executable) if in_venv else None)
        log_dir = os.path.abspath(cfg.log_dir) if cfg.log_dir and cfg.job_dir is None else None
        for role in app.roles:
            for k in range(role.num_replicas):
                replica = req.replicas[f"{role.name}-{k}"]
                if role.resource.gpu > 0:
                    for opt in ("gpus-per-task", "gpus-per-node", "ntasks"):
                        replica.sbatch_opts.pop(opt, None)
                    replica.sbatch_opts["gres"] = f"gpu:{role.resource.gpu}"
                if log_dir:
                    replica.sbatch_opts["output"] = os.path.join(log_dir, "slurm-%j.out")
                    for stream in ("output", "error"):
                        replica.srun_opts[stream] = os.path.join(log_dir, replica.srun_opts[stream])
        info.request = req
        return info

    def schedule(self, dryrun_info: AppDryRunInfo[SlurmBatchRequest, AppSlurmOpts]) -> str:
        req = dryrun_info.request
        # the log_dir that _submit_dryrun put in the replicas' paths ("" without one: torchx's default)
        first = next(iter(req.replicas.values()))
        log_dir = os.path.dirname(first.srun_opts["output"]) if req.job_dir is None else ""
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
        job_id = super().schedule(dryrun_info)
        if log_dir:
            _save_job_dir(job_id, log_dir)  # torchx's own table: its log_iter reads logs from there
        return job_id

    def describe(self, app_id: str) -> DescribeAppResponse | None:
        desc = super().describe(app_id)
        if desc is not None and desc.state == AppState.FAILED and desc.msg in ("", NONE):
            desc.msg = self._root_causes(app_id, desc) or desc.msg
        return desc

    def _root_causes(self, app_id: str, desc: DescribeAppResponse) -> str:
        """The failed rank and its error, from torchrun's failure summary in each replica's stderr log
        (``torchx status`` shows it as the app's message; ``torchx log`` has the whole traceback)."""
        log_dir = _get_job_dirs().get(app_id, "")
        causes = []
        for status in desc.roles_statuses:
            for replica in status.replicas:
                path = os.path.join(log_dir, f"slurm-{app_id}-{status.role}-{replica.id}.err")
                try:
                    with open(path, errors="replace") as f:
                        text = f.read()
                except OSError:
                    continue
                cause = _torchrun_root_cause(text)
                if cause:
                    causes.append(f"{status.role}/{replica.id}: {cause}")
        return "; ".join(causes)

    def _describe_squeue(self, app_id: str) -> DescribeAppResponse | None:
        out = subprocess.check_output(["squeue", "--json", "-j", app_id], stderr=PIPE, encoding="utf-8")
        wanted = int(app_id.split(";")[0])  # sbatch --parsable prints "<id>[;<cluster>]"
        jobs = [j for j in json.loads(out)["jobs"] if _job_id(j) == wanted or _het_leader(j) == wanted]
        if not jobs:
            return None
        roles: dict[str, Role] = {}
        statuses: dict[str, RoleStatus] = {}
        states: list[AppState] = []
        for job in sorted(jobs, key=_job_id):
            role_name, _, replica_id = job["name"].rpartition("-")
            if not role_name or not replica_id.isdigit():
                continue  # not a torchx replica
            state = get_appstate_from_job(job)
            states.append(state)
            resources = job.get("job_resources")  # absent while pending on Slurm 22.05
            role = roles.setdefault(role_name, Role(name=role_name, image=job["current_working_directory"],
                                                    entrypoint=job["command"], num_replicas=0))
            status = statuses.setdefault(role_name, RoleStatus(role_name, replicas=[]))
            if state == AppState.PENDING or not resources:
                hosts = [(self._squeue_pending_hostname(job, resources or None), None)]
            else:
                hosts = self._squeue_allocated_nodes(resources)
            for hostname, resource in hosts:
                if resource is not None:
                    role.resource = resource
                role.num_replicas += 1
                status.replicas.append(ReplicaStatus(id=int(replica_id), role=role_name, state=state,
                                                     hostname=hostname))
        if not states:
            return None
        state = min(states, key=lambda st: _STATE_RANK.get(st, _STATE_RANK[AppState.UNKNOWN]))
        return DescribeAppResponse(app_id=app_id, roles=list(roles.values()),
                                   roles_statuses=list(statuses.values()), state=state)


def _torchrun_root_cause(text: str) -> str:
    """``rank N (local_rank: M): <last line of its error>`` from the last "Root Cause" block torchrun's
    elastic agent prints when a worker fails; "" when there is none."""
    start = text.rfind("Root Cause (first observed failure):")
    if start < 0:
        return ""
    lines = text[start:].splitlines()[1:]
    block = []
    for line in lines:
        if line.startswith("====="):
            break
        block.append(line.strip())
    rank = next((ln.split(":", 1)[1].strip() for ln in block if ln.startswith("rank ")), "?")
    error = next((ln for ln in reversed(block) if ln), "")
    return f"rank {rank}: {error}"


def create_scheduler(session_name: str, **kwargs: Any) -> AppSlurmScheduler:
    """torchx scheduler factory (entry point ``torchx.schedulers: slurm``)."""
    return AppSlurmScheduler(session_name=session_name, docker_client=kwargs.get("docker_client"))
