"""``loratune evaluate RECIPE.yaml [model.adapter=DIR] [eval.limit=N] [key=value ...]``.

Scores the base model and/or an adapter on the recipe's evaluation split in one run:
generation CER/WER for Whisper (``task=asr``), chrF/BLEU for causal LMs (``task=sft``).
Writes ``metrics.json`` and a per-example CSV sorted worst first.
"""
from __future__ import annotations


def main(inv) -> int:
    cfg = inv.config()
    if cfg.task == "asr":
        from .evaluate_asr import evaluate
    else:
        from .evaluate_text import evaluate
    evaluate(cfg)
    return 0
