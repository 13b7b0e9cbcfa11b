#!/usr/bin/env bash
# The README's main command: sets up .venv if needed, then launches the 4-epoch method
# comparison (Adam, AdamAR, FAL, MEDA) of the DLRM app on the built-in synthetic data,
# 2 local CPU ranks through torchx (local_cwd scheduler, see .torchxconfig). It prints
# the per-epoch test-AUC table and writes runs/study/auc_by_epoch.png.
# Extra arguments go to the torchx component, e.g. `--resume`, or `train.epochs=2`.
# torchx gives every component argument a value, so the plain flags `--resume` and
# `--allow-config-change` become `--resume true` / `--allow_config_change true` here.
set -euo pipefail
cd "$(dirname "$0")/.."
flags=() args=()
while (($#)); do
  case "$1" in
    --resume|--allow-config-change|--allow_config_change)
      flag="${1//-/_}"; flags+=("--${flag#__}" true)  # first: torchx's overrides list takes all after it
      if (($# > 1)) && [[ "$2" != -* && "$2" != *=* ]]; then
        echo "demo.sh: $1 is a plain flag and takes no value; got '$1 $2'" >&2; exit 2
      fi ;;
    *) args+=("$1") ;;
  esac
  shift
done
bash scripts/bootstrap.sh
export PATH="$PWD/.venv/bin:$PATH"  # local_cwd runs torchrun from PATH
mkdir -p runs/torchx
# DEMO_TORCHX_OPTS: extra `torchx run` options, e.g. --dryrun (prints the job, runs nothing)
exec torchx run --wait --log ${DEMO_TORCHX_OPTS:-} launch/components.py:study ${flags[@]+"${flags[@]}"} ${args[@]+"${args[@]}"}
