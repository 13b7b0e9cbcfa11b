"""torchx components of torchrec-adaptive.

Run from the project root (``.torchxconfig`` makes ``local_cwd`` the default
scheduler and keeps logs under ``runs/torchx``)::

    PATH=$PWD/.venv/bin:$PATH torchx run launch/components.py:study      # the README's main job
    PATH=$PWD/.venv/bin:$PATH torchx run launch/components.py:dlrm --config configs/synthetic/adamar.yaml
    PATH=$PWD/.venv/bin:$PATH torchx run launch/components.py:demo       # the 2-line integration example

``local_cwd`` starts ``torchrun`` from the caller's PATH, not from the venv
torchx was installed in, hence the PATH prefix (``scripts/demo.sh`` does it).
On Slurm (tested on a one-node Slurm 22.05, docs/app.md "On Slurm") pass ``-s slurm``,
``-j NODESxPROCS`` and the resources per node (``--cpu``, ``--memMB``, ``--gpu``); torchx then
uses our scheduler (``launch/slurm.py``), which runs the job with the venv torchx came from::

    .venv/bin/torchx run -s slurm --wait launch/components.py:dlrm -j 1x2 --config configs/synthetic/adamar.yaml
    .venv/bin/torchx run -s slurm launch/components.py:dlrm -j 2x8 --gpu 8 --cpu 64 --memMB 480000 \
        --config configs/criteo/adamar.yaml --out /shared/runs/adamar

Kubernetes (untested) needs an ``image`` with this project installed::

    torchx run -s kubernetes -cfg queue=default launch/components.py:dlrm -j 4x8 --gpu 8 \
        --image registry/torchrec-adaptive:latest --config configs/criteo/adamar.yaml

A rank that raises makes the job fail: ``main`` is wrapped in torchelastic's ``@record``,
so torchx's status names the failed rank and its exception, and ``torchx run --wait``
exits non-zero.
"""


import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torchx.specs as specs
from torchx.components.dist import torchrun


def demo(
    *script_args: str,
    j: str = "1x2",
    steps: int = 60,
    image: str = "torchrec-adaptive",
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """Trains a small sharded EmbeddingBagCollection with AdamAR on ``j`` ranks (gloo on CPU).

    Args:
        script_args: extra arguments for ``torchrec_adaptive.examples.sharded_adamar``
        j: ``{nnodes}x{nproc_per_node}``, 2 local CPU ranks by default
        steps: training steps
        image: container image for docker/kubernetes schedulers (unused by local_cwd)
        env: extra environment variables
    """
    return torchrun(
        "--steps", str(steps), *script_args,
        m="torchrec_adaptive.examples.sharded_adamar",
        image=image,
        name="torchrec_adaptive/demo",
        j=j,
        cpu=1,
        memMB=4096,
        env={"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def _nproc(j: str) -> int:
    """Ranks per node of ``[min_nnodes:]nnodes x nproc_per_node`` (a bare integer: ranks on one node)."""
    return int(j.rpartition("x")[2])


def _resources(j: str, cpu: int, memMB: int, gpu: int) -> Tuple[int, int, int]:
    """CPUs, memory and GPUs per replica (one replica = one node running torchrun and its ranks):
    by default one CPU and 4 GiB per rank, GPUs only when asked for (then one per rank)."""
    nproc = _nproc(j)
    if cpu < 0 or memMB < 0 or gpu < 0:
        raise ValueError(f"cpu={cpu}, memMB={memMB}, gpu={gpu}: resources per node cannot be negative")
    if 0 < gpu < nproc:
        raise ValueError(f"gpu={gpu} GPUs per node for -j {j}: each of the {nproc} ranks on a node needs its own GPU")
    return cpu or nproc, memMB or 4096 * nproc, gpu


def _env(env: Optional[Dict[str, str]], j: str, cpu: int, gpu: int) -> Dict[str, str]:
    # On CPU the ranks share the node's CPUs: cpu // ranks threads each (1 with the default cpu, no
    # oversubscription), and glibc keeps a step's temporaries instead of page-faulting them back
    # in every step (host_memory.MALLOC_ENV, imported here: the package pulls torch in); on GPU
    # torch's own defaults.
    nproc = _nproc(j)
    if gpu:
        base = {"PYTHONUNBUFFERED": "1"}
    else:
        from torchrec_adaptive.kernels.host_memory import MALLOC_ENV

        base = {"OMP_NUM_THREADS": str(max(1, cpu // nproc)), "PYTHONUNBUFFERED": "1", **MALLOC_ENV}
    return {**base, **(env or {})}


def _role(kind: str, run: str) -> str:
    """The role name, which torchx makes the Slurm job name (``<role>-<replica>``) and the local log
    directory: the component and the run, e.g. ``dlrm_adamar``, so ``squeue`` says what runs."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", f"{kind}_{run}").strip("_")


def _launch(args: List[str], module: str, kind: str, run: str, j: str, cpu: int, memMB: int, gpu: int, image: str,
            env: Optional[Dict[str, str]]) -> specs.AppDef:
    cpu, memMB, gpu = _resources(j, cpu, memMB, gpu)
    app = torchrun(*args, m=module, image=image, name=f"torchrec_adaptive/{kind}", j=j, cpu=cpu, gpu=gpu,
                   memMB=memMB, env=_env(env, j, cpu, gpu))
    app.roles[0].name = _role(kind, run)
    return app


def _flag(name: str, value: str) -> bool:
    """torchx gives every component argument a value (a bare ``--resume`` is not possible there;
    ``scripts/demo.sh`` adds the ``true``). Only true/false are taken: torchx's own bool would read
    ``--resume yes`` or ``--resume 1`` as False without a word."""
    v = value.strip().lower()
    if v not in ("true", "false"):
        raise ValueError(f"--{name} takes true or false, got {value!r}")
    return v == "true"


def _run_flags(resume: str, allow_config_change: str, gpu: int) -> List[str]:
    flags = ["--device", "cuda" if gpu else "cpu"]  # --gpu N on a machine without GPUs fails, never runs on CPU
    if _flag("resume", resume):
        flags.append("--resume")
    if _flag("allow_config_change", allow_config_change):
        flags.append("--allow-config-change")
    return flags


def dlrm(
    *overrides: str,
    config: str = "configs/synthetic/adamar.yaml",
    out: str = "",
    resume: str = "false",
    allow_config_change: str = "false",
    j: str = "1x2",
    cpu: int = 0,
    memMB: int = 0,
    gpu: int = 0,
    image: str = "torchrec-adaptive",
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """Trains and evaluates one DLRM config (torchrec_adaptive.apps.dlrm.train).

    Args:
        overrides: config overrides KEY=VALUE, e.g. train.epochs=2 sparse_optimizer.kwargs.alpha=1e-3
        config: a YAML file under configs/
        out: run directory (default runs/<config name>)
        resume: true: continue the run in the run directory after its newest valid checkpoint (fails if there
            is none or the config changed)
        allow_config_change: true: with resume, go on with a changed config (recorded in config.json)
        j: {nnodes}x{nproc_per_node}; 2 local CPU ranks by default
        cpu: CPUs per node (per replica); 0: one per rank. On CPU each rank runs cpu/nproc_per_node threads
        memMB: memory per node (per replica) in MB; 0: 4096 per rank
        gpu: GPUs per node (0: CPU and gloo; else one per rank, so at least nproc_per_node)
        image: container image for docker/kubernetes schedulers (unused by local_cwd and slurm)
        env: extra environment variables
    """
    args: List[str] = ["--config", config]
    for o in overrides:
        args += ["--set", o]
    if out:
        args += ["--out", out]
    args += _run_flags(resume, allow_config_change, gpu)
    run = Path(out).name if out else Path(config).stem
    return _launch(args, "torchrec_adaptive.apps.dlrm.train", "dlrm", run, j, cpu, memMB, gpu, image, env)


def study(
    *overrides: str,
    configs: str = "configs/synthetic/adam.yaml,configs/synthetic/adamar.yaml,configs/synthetic/fal.yaml,"
                   "configs/synthetic/meda.yaml",
    out: str = "runs/study",
    seeds: str = "",
    resume: str = "false",
    allow_config_change: str = "false",
    j: str = "1x2",
    cpu: int = 0,
    memMB: int = 0,
    gpu: int = 0,
    image: str = "torchrec-adaptive",
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """Trains several configs one after another in the same ranks, then prints the per-epoch
    AUC table and writes the plot (torchrec_adaptive.apps.dlrm.study).

    Args:
        overrides: config overrides KEY=VALUE applied to every run
        configs: comma-separated YAML files
        out: study directory (one subdirectory per run, summary.md, auc_by_epoch.png)
        seeds: comma-separated seeds, e.g. 0,1,2: every config once per seed (<out>/seed_<s>/<run>),
            mean ± std over the seeds in the table and as bands in the plot; empty: the configs' own seed
        resume: true: skip complete runs, continue interrupted ones from their last valid checkpoint
        allow_config_change: true: with resume, go on with a changed config (recorded in config.json)
        j: {nnodes}x{nproc_per_node}; 2 local CPU ranks by default
        cpu: CPUs per node (per replica); 0: one per rank. On CPU each rank runs cpu/nproc_per_node threads
        memMB: memory per node (per replica) in MB; 0: 4096 per rank
        gpu: GPUs per node (0: CPU and gloo; else one per rank, so at least nproc_per_node)
        image: container image for docker/kubernetes schedulers (unused by local_cwd and slurm)
        env: extra environment variables
    """
    args: List[str] = ["--configs", *[c for c in configs.split(",") if c], "--out", out]
    if seeds.strip():
        args += ["--seeds", *[x.strip() for x in seeds.split(",") if x.strip()]]
    for o in overrides:
        args += ["--set", o]
    args += _run_flags(resume, allow_config_change, gpu)
    return _launch(args, "torchrec_adaptive.apps.dlrm.study", "study", Path(out).name, j, cpu, memMB, gpu, image, env)
