"""The ``train.*`` options as transformers TrainingArguments keywords, shared by both trainers.

``train_asr`` adds the Seq2Seq/generation keywords and builds ``Seq2SeqTrainingArguments``;
``train_sft`` adds TRL's and builds ``SFTConfig``. Keeping the common mapping here means the
schedule (warm-up as a fraction of an epoch, counted per optimiser step across all processes),
checkpointing and precision rules are the same for Whisper and causal LMs.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Dict, Optional


def steps_per_epoch(t, n_train: int) -> int:
    """Optimiser steps in one epoch: batches per process (``WORLD_SIZE`` of them) over accumulation."""
    world = world_size()
    return max(1, math.ceil(math.ceil(n_train / (t.batch_size * world)) / t.grad_accum))


def train_rows(train, t) -> int:
    """Rows of one epoch: the dataset's length, or for a stream (no ``__len__``; one endless epoch) the
    rows ``train.max_steps`` consume."""
    try:
        return len(train)
    except TypeError:
        return t.max_steps * samples_per_step(t)


def common_training_kwargs(t, n_train: int, eval_strategy: str, streaming: bool = False) -> Dict[str, Any]:
    """Keywords every trainer takes, from a :class:`loratune.config.TrainSection`."""
    import torch

    from loratune.core.speed import cpu_autocast_bf16

    cuda = torch.cuda.is_available()
    per_epoch = steps_per_epoch(t, n_train)
    warmup = math.ceil(t.warmup_epochs * per_epoch) if t.warmup_epochs > 0 else t.warmup_steps
    # Checkpoints follow evaluations so the best one can be reloaded; without evaluation, one per epoch
    # (a stream is one epoch long: checkpoints every train.eval_steps when given, for --resume)
    save_strategy = eval_strategy if eval_strategy != "no" else ("steps" if streaming and t.eval_steps else "epoch")
    best = bool(t.load_best_model_at_end and eval_strategy != "no")
    return dict(
        output_dir=t.output_dir,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        weight_decay=t.weight_decay,
        optim=t.optim,
        lr_scheduler_type=t.scheduler,
        warmup_steps=int(warmup),
        max_grad_norm=t.max_grad_norm,
        fp16=bool(t.fp16 and cuda),  # mixed precision is CUDA-only; on the CPU the switches are ignored
        # (TRL's SFTConfig would otherwise default bf16 to True); train.cpu_bf16: autocast on a CPU with bf16
        bf16=bool(t.bf16 and cuda) or cpu_autocast_bf16(t),
        use_cpu=not cuda,
        eval_strategy=eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy=save_strategy,
        save_steps=t.eval_steps if save_strategy == "steps" else 500,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=best,
        metric_for_best_model=t.metric_for_best_model if best else None,
        greater_is_better=False if best else None,  # loss, CER, WER: lower is better
        logging_steps=max(1, min(t.logging_steps, per_epoch)),  # >= 1 train-loss point per epoch for loss.png
        logging_first_step=True,
        seed=t.seed,
        dataloader_num_workers=t.num_workers,
        # no per-step GPU sync in the Trainer's loop, so the CPU queues step n+1 while the GPU runs
        # step n: the NaN filter reads each loss on the CPU (train.nan_inf_filter), and batches
        # are copied to the GPU asynchronously from the pinned memory the Trainer already uses
        logging_nan_inf_filter=t.nan_inf_filter,
        accelerator_config={"non_blocking": bool(cuda)},
        torch_compile=t.torch_compile,
        use_liger_kernel=t.liger_kernel,
        label_smoothing_factor=t.label_smoothing,  # SFT; the Whisper wing smooths in token_mean_loss  # transformers patches the model with Liger's kernels
    )


def last_complete_checkpoint(output_dir: Path) -> Optional[Path]:
    """Highest ``checkpoint-N`` holding ``trainer_state.json`` (written last, so a run killed while
    saving leaves a directory without it, which must not be resumed from)."""
    if not output_dir.is_dir():
        return None
    found = []
    for p in output_dir.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and p.is_dir() and (p / "trainer_state.json").is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def world_size() -> int:
    """Training processes (torchrun sets ``WORLD_SIZE``; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def samples_per_step(t) -> int:
    """Examples in one optimiser step across every process (batch x accumulation x world size)."""
    return t.batch_size * t.grad_accum * world_size()
