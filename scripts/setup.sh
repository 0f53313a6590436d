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
# Browser tests (tests/test_serve.py) drive Debian's Chromium through Playwright (never `playwright
# install`, which downloads its own browser); a CJK font lets the page render Chinese transcripts.
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
fc-list :lang=zh 2>/dev/null | grep -q . || missing+=(fonts-wqy-zenhei)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup.sh: please install ${missing[*]} (apt-get, as root) for the browser tests" >&2
  fi
fi
