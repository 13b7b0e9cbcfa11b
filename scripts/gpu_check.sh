#!/usr/bin/env bash
# One prepared command for a machine with an NVIDIA GPU (docs/performance.md, "GPU check"):
#
#   bash scripts/gpu_check.sh [OUT_DIR] [--dry-run] [--skip-bootstrap]
#
# 1. bootstrap: .venv with torch 2.13.0 and fbgemm-gpu==1.8.0 (scripts/bootstrap.sh picks the
#    CUDA wheel when nvidia-smi sees a GPU); not counted in the time budget below
# 2. env: the GPU, driver, torch/CUDA/FBGEMM/Triton versions
# 3. gpu_tests: the `gpu`-marked tests (tests/gpu): ours vs FBGEMM's fused ADAM and
#    EXACT_ROWWISE_ADAGRAD on CUDA (1e-5 after 100 steps), the Triton backend vs the eager chain
# 4. kernel_step: benchmarks/kernel_step.py --device cuda (ours vs FBGEMM fused Adam and row-wise
#    Adagrad, with the HBM-bandwidth floor)
# 5. app: one epoch of the DLRM app on one GPU with NCCL (torchrun, 1 rank): our AdamAR and Adam
#    and FBGEMM's fused Adam (stock) in one study, so their samples/s compare in the same process
# 6. summary: OUT_DIR/summary.json (every step's exit status and time, the tests' counts, the
#    ratios against the issue's targets) from the logs and JSON files the steps wrote
#
# Every step has its own time limit (all together 7 min 45 s after the bootstrap, so the whole
# check ends within 8 minutes); a failing step does not stop the next ones, and the script exits
# non-zero when any step failed. OUT_DIR: the first argument, else $OUT, else runs/gpu_check.
# --dry-run prints the steps and writes nothing (checkable on a CPU machine); --skip-bootstrap
# uses the .venv that exists (e.g. on a machine without a package index).
set -uo pipefail
cd "$(dirname "$0")/.."

out="" dry=0 bootstrap=1
for a in "$@"; do
  case "$a" in
    --dry-run) dry=1 ;;
    --skip-bootstrap) bootstrap=0 ;;
    -*) echo "gpu_check.sh: unknown option $a (use [OUT_DIR] [--dry-run] [--skip-bootstrap])" >&2; exit 2 ;;
    *) [ -z "$out" ] || { echo "gpu_check.sh: one OUT_DIR only, got '$out' and '$a'" >&2; exit 2; }; out="$a" ;;
  esac
done
out=${out:-${OUT:-runs/gpu_check}}
py=.venv/bin/python

# name, limit in seconds, then the command
STEPS=(
  "env|15|nvidia-smi && $py -c 'import torch, fbgemm_gpu, torchrec, triton; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"device\", torch.cuda.get_device_name(), \"fbgemm_gpu\", fbgemm_gpu.__version__, \"triton\", triton.__version__)'"
  "gpu_tests|150|$py -m pytest -q -m gpu tests/gpu -p no:cacheprovider --junitxml=$out/gpu_tests.xml"
  "kernel_step|90|$py benchmarks/kernel_step.py --device cuda --rounds 3 --json $out/kernel_step.json"
  "app|200|PATH=\$PWD/.venv/bin:\$PATH torchrun --standalone --nproc_per_node 1 -m torchrec_adaptive.apps.dlrm.study --device cuda --configs configs/synthetic/adamar.yaml configs/synthetic/adam.yaml configs/synthetic/stock_adam.yaml --set train.epochs=1 --out $out/app"
  "summary|10|$py scripts/gpu_check_summary.py $out"
)

if ((dry)); then
  echo "gpu_check.sh --dry-run: OUT_DIR=$out"
  ((bootstrap)) && echo "bootstrap: bash scripts/bootstrap.sh (fbgemm-gpu==1.8.0 where nvidia-smi sees a GPU; not timed)"
  total=0
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<<"$s"
    total=$((total + limit))
    echo "$name (limit ${limit}s): $cmd"
  done
  echo "limits together: ${total}s after the bootstrap"
  exit 0
fi

if ! (command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1); then
  echo "gpu_check.sh: no GPU (nvidia-smi sees none); this check is for a machine with an NVIDIA GPU" >&2
  exit 1
fi
mkdir -p "$out"
if ((bootstrap)); then
  bash scripts/bootstrap.sh 2>&1 | tee "$out/bootstrap.log" || { echo "gpu_check.sh: bootstrap failed ($out/bootstrap.log)" >&2; exit 1; }
fi
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}
: > "$out/steps.tsv"
failed=0
for s in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$s"
  echo "== $name (limit ${limit}s)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" bash -c "$cmd" > "$out/$name.log" 2>&1
  rc=$?
  secs=$(($(date +%s) - t0))
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" >> "$out/steps.tsv"
  tail -n 5 "$out/$name.log"
  echo "== $name: exit $rc after ${secs}s$([ "$rc" = 124 ] && echo ' (time limit)')"
  [ "$rc" = 0 ] || failed=1
done
echo "summary: $out/summary.json"
exit $failed
