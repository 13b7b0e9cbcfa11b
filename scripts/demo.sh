#!/usr/bin/env bash
# The README's main command: sets up .venv if needed, then launches the demo on
# 2 local CPU ranks through torchx (local_cwd scheduler, see .torchxconfig).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"  # local_cwd runs torchrun from PATH
mkdir -p runs/torchx
exec torchx run --wait --log launch/components.py:demo "$@"
