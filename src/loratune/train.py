"""``loratune train RECIPE.yaml [key=value ...] [--resume] [--gpus N]``: fine-tune an adapter.

Dispatches on ``task``: ``asr`` -> Whisper with transformers' Seq2SeqTrainer
(:mod:`loratune.train_asr`), ``sft`` -> causal LM with TRL's SFTTrainer (:mod:`loratune.train_sft`).
Examples::

    loratune train configs/whisper-base-hsk-qlora.yaml
    loratune train configs/whisper-large-v3-turbo-zh-qlora.yaml data.csv=ASR_CN.csv data.audio_dir=audio
    loratune train configs/gemma3-270m-hsk-zh-en-lora.yaml train.epochs=1 --resume
"""
from __future__ import annotations


def main(inv) -> int:
    cfg = inv.config()
    if inv.flags.get("gpus", 1) > 1:
        from .launch import relaunch

        return relaunch(inv)
    if cfg.task == "asr":
        from .train_asr import train
    else:
        from .train_sft import train
    train(cfg)
    return 0
