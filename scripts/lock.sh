#!/usr/bin/env bash
# Write requirements.lock from a virtual environment the whole suite passed in.
#
#   bash scripts/test.sh --latest && bash scripts/lock.sh .venv-latest && bash scripts/test.sh
#
# The lock is a pip constraints file: every installed distribution pinned with ==, loratune itself
# left out (it is installed editable), torch without its local build tag (+cpu / +cu128) so the
# same file serves CPU and CUDA builds of that version.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
[ -x "$VENV/bin/python" ] || { echo "lock.sh: no virtual environment at $VENV" >&2; exit 2; }
{
  echo "# The versions the whole test suite passed with; written by scripts/lock.sh from $VENV."
  echo "# scripts/setup.sh installs exactly these (pip -c); 'bash scripts/test.sh --latest' ignores them."
  echo "# python: $("$VENV/bin/python" -c 'import platform; print(platform.python_version())')"
  "$VENV/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
    | grep -v '^loratune' | sed -E 's/^(torch==[^+]+)\+.*/\1/' | LC_ALL=C sort -f
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "wrote requirements.lock ($(grep -c '==' requirements.lock) pins from $VENV)"
