#!/usr/bin/env bash
# The README's test command: installs the pinned stack into .venv (from scratch on
# a fresh clone), then runs the whole suite, distributed tests on 2 gloo ranks included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
