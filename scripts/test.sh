#!/usr/bin/env bash
# The README's test command: installs the pinned stack into .venv (from scratch on
# a fresh clone), then runs the whole suite, distributed tests on 2 gloo ranks included.
# The `slurm` tests (tests/launch) start a one-node Slurm on this machine (scripts/slurm_local.sh:
# root and apt) and stop it at the end, failed tests included; `-m "not slurm"` leaves them out.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
