#!/usr/bin/env bash
# README command one: the embedded default, offline on a CPU.
#   1. install (scripts/setup.sh), 2. QLoRA-fine-tune the packaged Whisper base on the HSK train
#   split, 3. score the dev split before (base) and after (adapter) in one evaluate run (the base's row
#   is stored in ~/.cache/loratune/eval-base on the first run and reused while nothing that decides it changes).
# Extra key=value arguments go to both steps, e.g. `bash scripts/run_default.sh train.epochs=1`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
RECIPE=configs/whisper-base-hsk-qlora.yaml
OUT=outputs/whisper-base-hsk-qlora
start=$(date +%s)
.venv/bin/loratune train "$RECIPE" "train.output_dir=$OUT" "$@"
.venv/bin/loratune evaluate "$RECIPE" "model.adapter=$OUT" "eval.output_dir=$OUT/eval" "$@"
echo "embedded default done in $(( $(date +%s) - start )) s: adapter, loss.png and summary.json in $OUT, scores in $OUT/eval"
