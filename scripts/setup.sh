#!/usr/bin/env bash
# Create the virtual environment and install loratune with everything its jobs and tests need
# (idempotent).
#
#   bash scripts/setup.sh            # .venv: the locked, tested versions (requirements.lock)
#   bash scripts/setup.sh --latest   # .venv-latest: the newest releases pyproject.toml allows
#   LORATUNE_DEPS=latest bash scripts/setup.sh   # the same switch as an environment variable
#
# requirements.lock pins every package the test suite passed with (pip constraints, written by
# scripts/lock.sh). torch is pinned there too, without its local build tag, so pip takes the
# machine's CPU build of 2.13.0 (a CUDA 2.13.0 installed first is kept as well).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${1:-}" = "--latest" ] && LORATUNE_DEPS=latest
MODE=${LORATUNE_DEPS:-locked}
case "$MODE" in
  locked) VENV=.venv; PIN=(-c requirements.lock) ;;
  latest) VENV=.venv-latest; PIN=(--upgrade --upgrade-strategy eager) ;;
  *) echo "setup.sh: LORATUNE_DEPS must be 'locked' or 'latest', not '$MODE'" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip >/dev/null 2>&1
if [ "$MODE" = locked ]; then
  TORCH=$(grep -E '^torch==' requirements.lock)
else
  TORCH=torch==2.13.0   # newest torch with a CPU build on this machine; a GPU machine keeps its own
fi
python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH"
python -m pip install -q "${PIN[@]}" -e ".[weights,serve,export,dev]"
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
