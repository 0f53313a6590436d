#!/usr/bin/env bash
# Create .venv and install loratune with everything its jobs and tests need (idempotent).
# torch==2.13.0 is pinned first so pip takes the local CPU build instead of a multi-GB CUDA one;
# on a GPU machine install your CUDA torch first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[weights,serve,export,dev]"
