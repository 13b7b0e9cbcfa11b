#!/usr/bin/env bash
# The README's main command: sets up .venv if needed, then launches the 4-epoch method
# comparison (Adam, AdamAR, FAL, MEDA) of the DLRM app on the built-in synthetic data,
# 2 local CPU ranks through torchx (local_cwd scheduler, see .torchxconfig). It prints
# the per-epoch test-AUC table and writes runs/study/auc_by_epoch.png.
# Extra arguments go to the torchx component, e.g. `--resume`, or `train.epochs=2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"  # local_cwd runs torchrun from PATH
mkdir -p runs/torchx
exec torchx run --wait --log launch/components.py:study "$@"
