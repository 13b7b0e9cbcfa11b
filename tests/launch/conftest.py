"""The one-node Slurm of ``scripts/slurm_local.sh`` for the ``slurm``-marked tests.

Started once per session by the first test that asks for it (so ``pytest tests/kernels`` never
pays for it) and stopped at the end even when tests fail, unless it was already up before the
session (a developer's running cluster is left running). If it cannot be started (no root, no
apt, a foreign /etc/slurm/slurm.conf) the tests fail with the script's reason: they never skip,
so CI cannot pass without having run them. ``pytest -m "not slurm"`` leaves them out on purpose.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "slurm_local.sh"


@pytest.fixture(scope="session")
def slurm_cluster():
    was_up = subprocess.run(["bash", str(SCRIPT), "status"], capture_output=True).returncode == 0
    if not was_up:
        proc = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            pytest.fail(f"the local Slurm (scripts/slurm_local.sh start) did not come up:\n"
                        f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}", pytrace=False)
    yield
    if not was_up:
        subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, text=True, timeout=120)
