"""``loratune evaluate RECIPE.yaml [model.adapter=DIR] [eval.limit=N] [key=value ...]``.

Scores the base model and/or an adapter on the recipe's evaluation split in one run:
generation CER/WER for Whisper (``task=asr``), chrF/BLEU for causal LMs (``task=sft``).
Writes ``metrics.json`` and a per-example CSV sorted worst first.
"""
from __future__ import annotations

import sys

# the config sections this verb reads: `loratune evaluate --help` lists only these
SECTIONS = ("task", "model", "quant", "data", "whisper", "sft", "eval", "generate")


def main(inv) -> int:
    cfg = inv.config()
    if cfg.task == "asr":
        from loratune.asr.evaluate import evaluate
    else:
        from loratune.llm.evaluate import evaluate
    report = evaluate(cfg)
    failures = (report.get("gate") or {}).get("failures") or []
    for line in failures:  # the regression gate (eval.max_*): CI can stop on exit code 3
        print(f"gate: {line}", file=sys.stderr)
    return 3 if failures else 0
