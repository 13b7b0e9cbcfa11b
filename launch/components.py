"""torchx components of torchrec-adaptive.

Run from the project root (``.torchxconfig`` makes ``local_cwd`` the default
scheduler and keeps logs under ``runs/torchx``)::

    PATH=$PWD/.venv/bin:$PATH torchx run launch/components.py:study      # the README's main job
    PATH=$PWD/.venv/bin:$PATH torchx run launch/components.py:dlrm --config configs/synthetic/adamar.yaml
    PATH=$PWD/.venv/bin:$PATH torchx run launch/components.py:demo       # the 2-line integration example

``local_cwd`` starts ``torchrun`` from the caller's PATH, not from the venv
torchx was installed in, hence the PATH prefix (``scripts/demo.sh`` does it).
On slurm or kubernetes, pass ``-s slurm``/``-s kubernetes`` and ``-j NODESxPROCS``
(plus an ``image`` with this project installed for kubernetes); the component
is the same, e.g.::

    torchx run -s slurm launch/components.py:dlrm -j 2x8 --gpu 8 --config configs/criteo/adamar.yaml \
        --out /shared/runs/adamar
    torchx run -s kubernetes -cfg queue=default launch/components.py:dlrm -j 4x8 --gpu 8 \
        --image registry/torchrec-adaptive:latest --config configs/criteo/adamar.yaml

A rank that raises makes the job fail: ``main`` is wrapped in torchelastic's ``@record``,
so torchx's status names the failed rank and its exception, and ``torchx run --wait``
exits non-zero.
"""


from typing import Dict, List, Optional

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


def _env(env: Optional[Dict[str, str]], gpu: int) -> Dict[str, str]:
    # On CPU each rank gets one thread: 2 ranks on 2 cores, no oversubscription.
    base = {"PYTHONUNBUFFERED": "1"} if gpu else {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return {**base, **(env or {})}


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
        gpu: GPUs per node (0: CPU and gloo)
        image: container image for docker/kubernetes schedulers (unused by local_cwd)
        env: extra environment variables
    """
    args: List[str] = ["--config", config]
    for o in overrides:
        args += ["--set", o]
    if out:
        args += ["--out", out]
    args += _run_flags(resume, allow_config_change, gpu)
    return torchrun(*args, m="torchrec_adaptive.apps.dlrm.train", image=image, name="torchrec_adaptive/dlrm",
                    j=j, cpu=1, gpu=gpu, memMB=8192, env=_env(env, gpu))


def study(
    *overrides: str,
    configs: str = "configs/synthetic/adam.yaml,configs/synthetic/adamar.yaml,configs/synthetic/fal.yaml,"
                   "configs/synthetic/meda.yaml",
    out: str = "runs/study",
    resume: str = "false",
    allow_config_change: str = "false",
    j: str = "1x2",
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
        resume: true: skip complete runs, continue interrupted ones from their last valid checkpoint
        allow_config_change: true: with resume, go on with a changed config (recorded in config.json)
        j: {nnodes}x{nproc_per_node}; 2 local CPU ranks by default
        gpu: GPUs per node (0: CPU and gloo)
        image: container image for docker/kubernetes schedulers (unused by local_cwd)
        env: extra environment variables
    """
    args: List[str] = ["--configs", *[c for c in configs.split(",") if c], "--out", out]
    for o in overrides:
        args += ["--set", o]
    args += _run_flags(resume, allow_config_change, gpu)
    return torchrun(*args, m="torchrec_adaptive.apps.dlrm.study", image=image, name="torchrec_adaptive/study",
                    j=j, cpu=1, gpu=gpu, memMB=8192, env=_env(env, gpu))
