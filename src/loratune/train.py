"""``loratune train RECIPE.yaml [key=value ...] [--resume] [--gpus N]``: fine-tune an adapter.

Dispatches on ``task``: ``asr`` -> Whisper with transformers' Seq2SeqTrainer
(:mod:`loratune.asr.train`), ``sft`` -> causal LM with TRL's SFTTrainer (:mod:`loratune.llm.train`).
Examples::

    loratune train configs/whisper-base-hsk-qlora.yaml
    loratune train configs/whisper-large-v3-turbo-zh-qlora.yaml data.csv=ASR_CN.csv data.audio_dir=audio
    loratune train configs/gemma3-270m-hsk-zh-en-lora.yaml train.epochs=1 --resume
"""
from __future__ import annotations

# the config sections this verb reads: `loratune train --help` lists only these
SECTIONS = ("task", "model", "quant", "lora", "data", "whisper", "augment", "sft", "train")


def main(inv) -> int:
    cfg = inv.config()
    if inv.flags.get("gpus", 1) > 1:
        from loratune.core.launch import relaunch

        return relaunch(inv)
    if cfg.task == "asr":
        from loratune.asr.train import train
    else:
        from loratune.llm.train import train
    train(cfg)
    return 0
