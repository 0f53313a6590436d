#!/usr/bin/env bash
# One row of benchmarks/ACCURACY.md: train the embedded-default recipe with overrides, score dev.
#
#   bash benchmarks/accuracy_runs.sh NAME [key=value ...] [eval:key=value ...]
#   FROM=OTHER bash benchmarks/accuracy_runs.sh NAME eval:whisper.trim_audio=false   # re-score OTHER's adapter
#
# Training overrides go to both steps; `eval:` ones only to evaluate. Outputs in outputs/acc/NAME,
# logs in outputs/acc/logs, one line per run appended to outputs/acc/results.tsv
# (name, dev CER, training seconds, evaluation seconds, arguments).
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
NAME=$1; shift
R=configs/whisper-base-hsk-qlora.yaml
ROOT=outputs/acc; OUT=$ROOT/$NAME; mkdir -p "$ROOT/logs"
TRAIN=(); EVAL=()
for a in "$@"; do case "$a" in eval:*) EVAL+=("${a#eval:}");; *) TRAIN+=("$a");; esac; done
if [ -n "${FROM:-}" ] && [ ! -e "$OUT" ]; then mkdir -p "$OUT"; cp "$ROOT/$FROM"/*.json "$ROOT/$FROM"/*.safetensors "$ROOT/$FROM"/*.yaml "$OUT"/; fi
t0=$(date +%s)
if [ ! -f "$OUT/adapter_model.safetensors" ]; then
  .venv/bin/loratune train "$R" "train.output_dir=$OUT" "${TRAIN[@]}" > "$ROOT/logs/$NAME.train.log" 2>&1 \
    || { printf "%s\ttrain failed\n" "$NAME" >> "$ROOT/results.tsv"; exit 1; }
fi
t1=$(date +%s)
.venv/bin/loratune evaluate "$R" "model.adapter=$OUT" "eval.output_dir=$OUT/eval" eval.compare_base=false \
  "${TRAIN[@]}" "${EVAL[@]}" > "$ROOT/logs/$NAME.eval.log" 2>&1
t2=$(date +%s)
cer=$(python3 -c "import json; print(json.load(open('$OUT/eval/metrics.json'))['results']['adapter']['cer'])" 2>/dev/null)
printf "%s\t%s\t%s\t%s\t%s\n" "$NAME" "$cer" "$((t1 - t0))" "$((t2 - t1))" "$*" >> "$ROOT/results.tsv"
