"""Whisper LoRA / QLoRA fine-tuning on transformers' ``Seq2SeqTrainer``.

    loratune train configs/whisper-base-hsk-qlora.yaml [key=value ...] [--resume]
    python -c "from loratune.config import load_config; from loratune.train_asr import train; train(load_config('r.yaml'))"

Order of work: resolve the model name -> processor -> data (every row validated, features cached)
-> model (quantised per ``quant``) -> LoRA (target modules checked) -> train -> save. Every input
error therefore stops the run before the first optimiser step.

Writes to ``train.output_dir``: ``checkpoint-*`` (for ``--resume``), ``runs/`` (TensorBoard), and at
the end the adapter only (``adapter_model.safetensors`` + ``adapter_config.json``, PEFT format),
the processor, ``loratune_config.yaml`` (resolved config), ``loss.png`` (train/valid loss per
epoch) and ``summary.json`` (also printed).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional

from .errors import DataError
from .trainer_args import last_complete_checkpoint  # noqa: F401  (re-exported for the tests)

log = logging.getLogger(__name__)

CER_LANGUAGES = {"zh", "ja", "ko", "th", "yue", "my", "lo", "chinese", "japanese", "korean", "thai", "cantonese"}


def metric_name(cfg) -> str:
    """``cer`` or ``wer`` for generation scoring (``auto``: CER for unsegmented scripts)."""
    if cfg.whisper.metric != "auto":
        return cfg.whisper.metric
    return "cer" if (cfg.whisper.language or "").lower() in CER_LANGUAGES else "wer"


def build_compute_metrics(cfg, processor):
    """Generation CER/WER on the validation set; None (and no generation) unless
    ``train.generate_during_eval``. The scoring functions live in :mod:`loratune.metrics`."""
    if not cfg.train.generate_during_eval:
        return None
    import numpy as np

    from . import metrics  # imported only when generation scoring is asked for

    name = metric_name(cfg)
    score = getattr(metrics, name)
    tok = processor.tokenizer

    def compute_metrics(pred) -> Dict[str, float]:
        preds = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        labels = np.where(pred.label_ids == -100, tok.pad_token_id, pred.label_ids)
        preds = np.where(preds == -100, tok.pad_token_id, preds)
        hyps = tok.batch_decode(preds, skip_special_tokens=True)
        refs = tok.batch_decode(labels, skip_special_tokens=True)
        return {name: float(score(refs, hyps, language=cfg.whisper.language))}

    return compute_metrics


def token_mean_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy summed over label tokens / label tokens of the whole optimiser step.

    The Trainer counts ``num_items_in_batch`` over every accumulated micro-batch and every rank, so
    each token weighs the same however the step is split: 2 ranks x batch 2 give the gradient of
    1 process x batch 4, and accumulation no longer over-weights short transcripts (the model's own
    loss is a per-micro-batch mean, a mean of means under accumulation and DDP).
    """
    import torch.nn.functional as F

    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    labels = labels.to(logits.device)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                            ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()
    return total / count


def training_arguments(cfg, n_train: int, has_eval: bool):
    """Seq2SeqTrainingArguments from ``cfg.train`` (warm-up in epochs converted to steps)."""
    import dataclasses

    from transformers import Seq2SeqTrainingArguments

    from .trainer_args import common_training_kwargs

    t = cfg.train
    eval_strategy = t.eval_strategy if has_eval else "no"
    gen = bool(t.generate_during_eval and has_eval)
    kwargs = dict(
        common_training_kwargs(t, n_train, eval_strategy),
        report_to=t.report_to,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        length_column_name="input_length",
        remove_unused_columns=False,  # the collator picks the columns it needs
        label_names=["labels"],  # PeftModel.forward(*args, **kwargs) hides them from inspection
        predict_with_generate=gen,
        generation_max_length=cfg.whisper.generation_max_length if gen else None,
        generation_num_beams=cfg.whisper.num_beams if gen else None,
    )
    known = {f.name for f in dataclasses.fields(Seq2SeqTrainingArguments)}
    return Seq2SeqTrainingArguments(**{k: v for k, v in kwargs.items() if k in known})


def _summary(cfg, trainer, result, started: float, resumed_from: Optional[int], data_report, model) -> Dict[str, Any]:
    from .reporting import peak_memory_gb

    state = trainer.state
    best_epoch = None
    if state.best_global_step:
        for entry in state.log_history:
            if entry.get("step") == state.best_global_step and cfg.train.metric_for_best_model in entry:
                best_epoch = entry.get("epoch")
    metrics = result.metrics if result is not None else {}
    report = getattr(model, "loratune_report", {}) or {}
    return {
        "output_dir": str(Path(cfg.train.output_dir).resolve()),
        "base_model": getattr(model, "name_or_path", None) or cfg.model.name,
        "metric_for_best_model": cfg.train.metric_for_best_model,
        "best_metric": state.best_metric,
        "best_epoch": best_epoch,
        "best_checkpoint": state.best_model_checkpoint,
        "epochs_run": round(state.epoch or 0.0, 3),
        "global_step": state.global_step,
        "resumed_from_step": resumed_from,
        "wall_time_s": round(time.time() - started, 1),
        "train_runtime_s": metrics.get("train_runtime"),
        "train_samples_per_second": metrics.get("train_samples_per_second"),
        "train_loss": metrics.get("train_loss"),
        "train_examples": data_report.get("train_rows"),
        "eval_examples": data_report.get("eval_rows"),
        "skipped_rows": sum(data_report.get("skipped", {}).values()),
        "skipped_by_reason": data_report.get("skipped", {}),
        "feature_cache_hit": data_report.get("cache_hit"),
        **peak_memory_gb(),
        **report,
    }


def train(cfg) -> Dict[str, Any]:
    """Run one fine-tune as configured; returns the summary dict (also in ``summary.json``)."""
    import torch
    from accelerate import PartialState
    from transformers import EarlyStoppingCallback, Seq2SeqTrainer, set_seed

    from .config import save_config
    from .data.asr import prepare_asr_data
    from .data.collator import WhisperCollator
    from .models.speed import check_device_support
    from .models.whisper import attach_whisper_lora, load_processor, load_whisper, max_label_tokens, resolve_name
    from .reporting import epoch_losses, format_summary, plot_losses, step_timer, write_json
    from .trainer_args import samples_per_step

    check_device_support(cfg)  # bf16 / flex attention on a device that cannot run them: stop now
    started = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.train.output_dir)

    resume_from = None
    if cfg.train.resume:
        ckpt = last_complete_checkpoint(out)
        if ckpt is None:
            log.warning("train.resume: no complete checkpoint in %s; starting from scratch", out)
        else:
            resume_from = ckpt
            log.info("resuming from %s", ckpt)

    # 1. data: every row validated (and features cached) before the model is even loaded
    path = resolve_name(cfg.model.name)
    processor = load_processor(path)
    with PartialState().main_process_first():  # under DDP rank 0 fills the feature cache, the others reuse it
        data = prepare_asr_data(cfg, processor, max_label_tokens=max_label_tokens(path))
    if data.eval is None and cfg.train.eval_strategy != "no":
        raise DataError("no validation rows (the eval split is empty or every row was skipped); "
                        "set data.eval_split / data.eval_ratio, or train.eval_strategy=no")
    # 2. model + adapter (target modules are checked here, still before any training)
    set_seed(cfg.train.seed)
    model, _, path = load_whisper(cfg, for_training=True)  # keep the processor with the prefix set
    model = attach_whisper_lora(model, cfg)
    # Whisper's forward takes **kwargs but ignores `num_items_in_batch`; left alone, the Trainer would
    # multiply its per-rank mean loss by the world size under DDP (2x gradients on 2 ranks; caught by
    # tests/test_distributed.py). The loss is computed by `token_mean_loss` instead.
    model.get_base_model().accepts_loss_kwargs = False

    args = training_arguments(cfg, len(data.train), data.eval is not None)
    timer = step_timer()  # steady samples/s for summary.json (warm-up and evaluations left out)
    callbacks = [timer]
    if cfg.train.early_stopping_patience and args.load_best_model_at_end:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=data.train.with_format("numpy"),
        eval_dataset=data.eval.with_format("numpy") if data.eval is not None else None,
        data_collator=WhisperCollator(decoder_start_token_id=model.config.decoder_start_token_id, frames_major=True,
                                      pad_token_id=model.config.pad_token_id,
                                      label_multiple=8 if cfg.train.compile_layers else 1),
        compute_loss_func=token_mean_loss,
        processing_class=processor.feature_extractor,
        compute_metrics=build_compute_metrics(cfg, processor),
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    resumed_step = int(resume_from.name.split("-")[1]) if resume_from else None

    summary = _summary(cfg, trainer, result, started, resumed_step, data.report, model)
    summary.update(timer.report(samples_per_step(cfg.train)))
    if trainer.is_world_process_zero():  # under DDP only rank 0 writes
        trainer.model.save_pretrained(out, safe_serialization=True)  # PEFT: the adapter only
        processor.save_pretrained(out)
        save_config(cfg, out)
        curves = epoch_losses(trainer.state.log_history)
        summary["loss_per_epoch"] = curves
        plot_losses(curves, out / "loss.png", title=f"{Path(cfg.model.name).name}: loss per epoch")
        write_json(summary, out / "summary.json")
        print(format_summary(summary), flush=True)
    return summary
