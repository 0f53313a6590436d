"""Causal-LM (Q)LoRA supervised fine-tuning with TRL's SFTTrainer (``task: sft``).

    loratune train configs/gemma3-270m-hsk-zh-en-lora.yaml
    loratune train configs/phi3-mini-yoda-qlora.yaml train.epochs=1 --resume

The causal-LM wing of :mod:`loratune.core.training` (which owns the sequence and the outputs). The
wing supplies: the tokenizer and tokenised datasets (bad rows, empty answers, over-long prompts and a
missing chat template stop the run before the model loads, ``llm.data``), the (quantised) base with
LoRA targets checked against its real layers (``llm.model``), and TRL's ``SFTTrainer``.
"""
from __future__ import annotations

import logging

from loratune.config import RunConfig
from loratune.core.training import Prepared, Wing, run_training

log = logging.getLogger(__name__)


def sft_args(cfg: RunConfig, n_train: int):
    """TRL SFTConfig from the TrainSection (warm-up as a fraction of an epoch, CPU-safe precision)."""
    import dataclasses

    from trl import SFTConfig

    from loratune.core.trainer_args import common_training_kwargs

    t = cfg.train
    common = common_training_kwargs(t, n_train, t.eval_strategy, streaming=cfg.data.streaming)
    full_ckpt = bool(t.gradient_checkpointing and t.checkpoint_fraction >= 1.0)
    # attach_lora has switched checkpointing on already; the Trainer would switch it on for every layer
    # again, undoing train.checkpoint_fraction < 1. The argument's name moved within transformers 5
    # (5.24, the lock: activation_checkpointing; 5.17, the GPU image: gradient_checkpointing)
    fields = {f.name for f in dataclasses.fields(SFTConfig)}
    ckpt = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return SFTConfig(
        **common,
        **{ckpt: full_ckpt, f"{ckpt}_kwargs": {"use_reentrant": False} if full_ckpt else None},
        data_seed=cfg.data.seed,
        report_to=[r for r in t.report_to if r != "none"] or "none",
        train_sampling_strategy="group_by_length" if t.group_by_length and not cfg.sft.packing else "random",
        # data prepared by loratune.llm.data: TRL keeps our labels, truncates and packs
        max_length=cfg.sft.max_length,
        packing=cfg.sft.packing,
        packing_strategy="wrapped" if cfg.sft.packing else "bfd",  # bfd needs flash-attention's padding-free path
        completion_only_loss=cfg.sft.completion_only_loss,
        dataset_num_proc=None,
        remove_unused_columns=True,
    )


def _prepare(cfg) -> Prepared:
    from loratune.llm.data import build_sft_datasets
    from loratune.llm.model import load_tokenizer

    tokenizer = load_tokenizer(cfg)
    if cfg.data.streaming:  # rows tokenised and checked as they pass (llm.stream); validation rows up front
        from loratune.llm.stream import build_sft_stream

        train_ds, eval_ds, data = build_sft_stream(cfg, tokenizer)
        report = {"train_rows": None, "eval_rows": len(eval_ds) if eval_ds is not None else 0, "data": data,
                  "stream": data["stream"]}
    else:
        train_ds, eval_ds, data = build_sft_datasets(cfg, tokenizer)  # all data errors surface here
        report = {"train_rows": len(train_ds), "eval_rows": len(eval_ds) if eval_ds is not None else 0, "data": data}
    use_eval = eval_ds is not None and len(eval_ds) > 0 and cfg.train.eval_strategy != "no"
    return Prepared(processor=tokenizer, train=train_ds, eval=eval_ds if use_eval else None, report=report)


def _build_model(cfg):
    from loratune.core.adapters import attach_lora
    from loratune.llm.model import load_causal_lm

    return attach_lora(load_causal_lm(cfg, trainable=True), cfg, task_type="CAUSAL_LM")


def _make_trainer(cfg, model, data: Prepared, callbacks):
    from trl import SFTTrainer

    from loratune.core.trainer_args import train_rows

    return SFTTrainer(model=model, args=sft_args(cfg, train_rows(data.train, cfg.train)), train_dataset=data.train,
                      eval_dataset=data.eval, processing_class=data.processor, callbacks=callbacks)


def _card_notes(cfg) -> list:
    return [f"| SFT | template {cfg.sft.template}, max_length {cfg.sft.max_length}, completion-only loss "
            f"{cfg.sft.completion_only_loss}, packing {cfg.sft.packing} |"]


WING = Wing(task="sft", prepare=_prepare, build_model=_build_model, make_trainer=_make_trainer, card_notes=_card_notes)


def train(cfg: RunConfig) -> dict:
    """Run one SFT job end to end; returns the summary written to ``summary.json``."""
    return run_training(cfg, WING)
