#!/usr/bin/env bash
# Makes the project virtualenv .venv with the pinned stack of DEVELOPERS.md, from
# nothing. Re-runs are cheap: it reinstalls only when requirements/ changed.
#
# Why a script and not `pip install .`: torchrec 1.8.0 must be installed with
# --no-deps (its metadata asks for the CUDA wheel name `fbgemm-gpu`), and the
# FBGEMM wheel differs between CPU (fbgemm-gpu-cpu) and CUDA (fbgemm-gpu) machines.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
stamp=$(cat requirements/*.txt pyproject.toml setup.py scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ -f .venv/.bootstrapped ] && [ "$(cat .venv/.bootstrapped)" = "$stamp" ]; then
  exit 0
fi

echo "bootstrap: creating .venv with $("$PY" --version)" >&2
rm -rf .venv
"$PY" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check -c requirements/constraints.txt)

"${pip[@]}" torch==2.13.0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" fbgemm-gpu==1.8.0
else
  "${pip[@]}" fbgemm-gpu-cpu==1.8.0
  "${pip[@]}" -r requirements/cpu.txt  # triton for the interpreter tests (CUDA torch brings its own)
fi
"${pip[@]}" --no-deps torchrec==1.8.0
"${pip[@]}" -r requirements/base.txt
# --no-build-isolation: setup.py sees this torch and compiles the fused CPU loops now, one
# build per instruction set (torchrec_adaptive/kernels/cpu_isa.py); without a compiler the
# install still succeeds and the loops are compiled on first use.
"${pip[@]}" --no-deps --no-build-isolation -e .

.venv/bin/python -c "import torch, fbgemm_gpu, torchrec, torchrec_adaptive; print('bootstrap: torch', torch.__version__, '| torchrec', torchrec.__version__ if hasattr(torchrec, '__version__') else '1.8.0')" >&2
echo "$stamp" > .venv/.bootstrapped
