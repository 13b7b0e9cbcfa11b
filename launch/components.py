"""torchx components of torchrec-adaptive.

Run from the project root (``.torchxconfig`` makes ``local_cwd`` the default
scheduler and keeps logs under ``runs/torchx``)::

    PATH=$PWD/.venv/bin:$PATH torchx run launch/components.py:demo

``local_cwd`` starts ``torchrun`` from the caller's PATH, not from the venv
torchx was installed in, hence the PATH prefix (``scripts/demo.sh`` does it).
On slurm or kubernetes, pass ``-s slurm``/``-s kubernetes`` and ``-j NODESxPROCS``
(plus an ``image`` with this project installed for kubernetes); the component
is the same.
"""


from typing import Dict, Optional

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
