#!/usr/bin/env bash
# README command two: install, lint, then run the whole offline test suite (slow tests included).
#
#   bash scripts/test.sh              # on the locked, tested versions (.venv)
#   bash scripts/test.sh --latest     # on the newest releases (.venv-latest); if it passes,
#                                     # `bash scripts/lock.sh .venv-latest` refreshes the lock
# Other arguments go to pytest, e.g. `bash scripts/test.sh -k transcribe`.
set -euo pipefail
cd "$(dirname "$0")/.."
export LORATUNE_DEPS=${LORATUNE_DEPS:-locked}
if [ "${1:-}" = "--latest" ]; then LORATUNE_DEPS=latest; shift; fi
bash scripts/setup.sh
VENV=.venv; [ "$LORATUNE_DEPS" = latest ] && VENV=.venv-latest
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$VENV/bin/ruff" check src tests benchmarks scripts
exec "$VENV/bin/python" -m pytest -q "$@"
