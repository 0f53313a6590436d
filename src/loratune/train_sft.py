"""Causal-LM (Q)LoRA supervised fine-tuning with TRL's SFTTrainer (``task: sft``).

    loratune train configs/gemma3-270m-hsk-zh-en-lora.yaml
    loratune train configs/phi3-mini-yoda-qlora.yaml train.epochs=1 --resume

Order of work: data checks and tokenisation first (bad rows, empty answers, over-long prompts and a
missing chat template stop the run before the model loads), then the base model (quantised per
``quant``), LoRA targets checked against its real layers, training, and the outputs in
``train.output_dir``: the adapter (safetensors), the tokenizer, ``loratune_config.yaml``,
``loss.png`` and ``summary.json``. ``model.adapter=<output_dir>`` then uses it anywhere.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import List

from .config import RunConfig, save_config
from .errors import ConfigError

log = logging.getLogger(__name__)


def _write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
    os.replace(tmp, path)


def plot_losses(log_history: List[dict], path: Path) -> None:
    """Training (and validation) loss against optimiser steps, written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".loss.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


def sft_args(cfg: RunConfig, n_train: int):
    """TRL SFTConfig from the TrainSection (warm-up as a fraction of an epoch, CPU-safe precision)."""
    from trl import SFTConfig

    from .trainer_args import common_training_kwargs

    t = cfg.train
    common = common_training_kwargs(t, n_train, t.eval_strategy)
    full_ckpt = bool(t.gradient_checkpointing and t.checkpoint_fraction >= 1.0)
    return SFTConfig(
        **common,
        # transformers 5's name for gradient checkpointing. attach_lora has switched it on already; the
        # Trainer would switch it on for every layer again, undoing train.checkpoint_fraction < 1
        activation_checkpointing=full_ckpt,
        activation_checkpointing_kwargs={"use_reentrant": False} if full_ckpt else None,
        data_seed=cfg.data.seed,
        report_to=[r for r in t.report_to if r != "none"] or "none",
        train_sampling_strategy="group_by_length" if t.group_by_length and not cfg.sft.packing else "random",
        # data prepared by loratune.data.sft: TRL keeps our labels, truncates and packs
        max_length=cfg.sft.max_length,
        packing=cfg.sft.packing,
        packing_strategy="wrapped" if cfg.sft.packing else "bfd",  # bfd needs flash-attention's padding-free path
        completion_only_loss=cfg.sft.completion_only_loss,
        dataset_num_proc=None,
        remove_unused_columns=True,
    )


def train(cfg: RunConfig) -> dict:
    """Run one SFT job end to end; returns the summary written to ``summary.json``."""
    import torch
    from transformers import EarlyStoppingCallback, set_seed
    from trl import SFTTrainer

    from .data.sft import build_sft_datasets
    from .models.adapters import attach_lora
    from .models.causal import load_causal_lm, load_tokenizer
    from .models.speed import apply_training_speed, check_device_support
    from .reporting import peak_memory_gb, step_timer
    from .trainer_args import last_complete_checkpoint, samples_per_step

    check_device_support(cfg)  # bf16 / flex attention on a device that cannot run them: stop now
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.train.output_dir)
    resume_from = None
    if cfg.train.resume:
        resume_from = last_complete_checkpoint(Path(cfg.train.output_dir))
        if resume_from is None:
            raise ConfigError(f"train.resume=true but {out} has no checkpoint-* folder; drop --resume to start fresh")
    start = time.time()
    tokenizer = load_tokenizer(cfg)
    train_ds, eval_ds, data_report = build_sft_datasets(cfg, tokenizer)  # all data errors surface here
    set_seed(cfg.train.seed)  # the LoRA A matrices are random: same seed, same adapter init (and DDP ranks agree)
    model = load_causal_lm(cfg, trainable=True)
    model = attach_lora(model, cfg, task_type="CAUSAL_LM")
    apply_training_speed(model, cfg)  # off unless train.* speed options are set
    args = sft_args(cfg, len(train_ds))
    timer = step_timer()  # steady sequences/s for summary.json (warm-up and evaluations left out)
    callbacks = [timer]
    if cfg.train.early_stopping_patience is not None:
        if not args.load_best_model_at_end:
            raise ConfigError("train.early_stopping_patience needs train.load_best_model_at_end=true")
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds if cfg.train.eval_strategy != "no" else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)  # written first, so a crashed run still says what it was
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    trainer.save_model(str(out))  # adapter_model.safetensors + adapter_config.json (+ tokenizer)
    tokenizer.save_pretrained(str(out))
    metrics = {}
    if eval_ds is not None and cfg.train.eval_strategy != "no":
        # the last evaluation already scored the final weights unless the best checkpoint was reloaded
        last = [h for h in trainer.state.log_history if "eval_loss" in h]
        fresh = last and last[-1]["step"] == trainer.state.global_step and not args.load_best_model_at_end
        metrics = last[-1] if fresh else trainer.evaluate()
    plot_losses(trainer.state.log_history, out / "loss.png")
    summary = {
        "task": "sft",
        "model": cfg.model.name,
        "quant_bits": cfg.quant.bits,
        "output_dir": str(out),
        "train_examples": len(train_ds),
        "eval_examples": len(eval_ds),
        "data": data_report,
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss": result.training_loss,
        "eval_loss": metrics.get("eval_loss"),
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "wall_time_s": round(time.time() - start, 1),
        **timer.report(samples_per_step(cfg.train)),
        **peak_memory_gb(),
        **getattr(model, "loratune_report", {}),
    }
    _write_json(out / "summary.json", summary)
    log.info("adapter saved to %s (train loss %.4f, eval loss %s, %.0f s)", out, result.training_loss,
             summary["eval_loss"], summary["wall_time_s"])
    return summary
