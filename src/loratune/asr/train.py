"""Whisper LoRA / QLoRA fine-tuning on transformers' ``Seq2SeqTrainer``.

    loratune train configs/whisper-base-hsk-qlora.yaml [key=value ...] [--resume]
    python -c "from loratune.config import load_config; from loratune.asr.train import train; train(load_config('r.yaml'))"

This module is the Whisper wing of :mod:`loratune.core.training`, which owns the sequence (device
check, output/resume rules, seed, speed switches, callbacks, rank-0 outputs, summary, model card).
The wing supplies: the processor and the log-mel datasets (every row validated, features cached,
``asr.features``), the quantised Whisper with LoRA (``asr.model``), and a ``Seq2SeqTrainer`` with
the Whisper collator and the token-mean loss.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Dict

from loratune.core.training import Prepared, Wing, run_training

log = logging.getLogger(__name__)

def compute_metrics_for(cfg, processor):
    """Generation CER/WER on the validation set (the same metric rule as ``loratune evaluate``:
    ``core.metrics.metric_for``); None, and no generation, unless ``train.generate_during_eval``."""
    if not cfg.train.generate_during_eval:
        return None
    from loratune.core.metrics import build_compute_metrics

    return build_compute_metrics(processor, cfg.whisper.metric, cfg.whisper.language)


def token_mean_loss(outputs, labels, num_items_in_batch=None, label_smoothing: float = 0.0):
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
                            ignore_index=-100, reduction="sum", label_smoothing=label_smoothing)
    count = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum()
    return total / count


def training_arguments(cfg, n_train: int, has_eval: bool):
    """Seq2SeqTrainingArguments from ``cfg.train`` (warm-up in epochs converted to steps)."""
    import dataclasses

    from transformers import Seq2SeqTrainingArguments

    from loratune.core.trainer_args import common_training_kwargs

    t = cfg.train
    eval_strategy = t.eval_strategy if has_eval else "no"
    gen = bool(t.generate_during_eval and has_eval)
    kwargs = dict(
        common_training_kwargs(t, n_train, eval_strategy, streaming=cfg.data.streaming),
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


def _prepare(cfg) -> Prepared:
    from accelerate import PartialState

    from loratune.asr.features import prepare_asr_data
    from loratune.asr.model import load_processor, max_label_tokens, resolve_name

    path = resolve_name(cfg.model.name)
    processor = load_processor(path)
    if cfg.data.streaming:  # no cache: rows are decoded and checked as they pass (asr.stream)
        from loratune.asr.stream import prepare_streaming_asr

        data = prepare_streaming_asr(cfg, processor, max_label_tokens=max_label_tokens(path))
    else:
        with PartialState().main_process_first():  # under DDP rank 0 fills the feature cache, the others reuse it
            data = prepare_asr_data(cfg, processor, max_label_tokens=max_label_tokens(path))
    report = dict(data.report)
    report["feature_cache_hit"] = report.pop("cache_hit", None)
    return Prepared(processor=processor, train=data.train, eval=data.eval, report=report)


def _build_model(cfg):
    from loratune.asr.model import attach_whisper_lora, load_whisper

    model, _, _ = load_whisper(cfg, for_training=True)  # keep the processor with the prefix set
    model = attach_whisper_lora(model, cfg)  # target modules are checked here, still before any training
    # Whisper's forward takes **kwargs but ignores `num_items_in_batch`; left alone, the Trainer would
    # multiply its per-rank mean loss by the world size under DDP (2x gradients on 2 ranks; caught by
    # tests/test_distributed.py). The loss is computed by `token_mean_loss` instead.
    model.get_base_model().accepts_loss_kwargs = False
    return model


def _make_trainer(cfg, model, data: Prepared, callbacks):
    from transformers import Seq2SeqTrainer

    from loratune.asr.augment import AudioAugment
    from loratune.asr.collator import WhisperCollator
    from loratune.core.trainer_args import train_rows

    args = training_arguments(cfg, train_rows(data.train, cfg.train), data.eval is not None)
    augment = AudioAugment.from_config(cfg.augment, cfg.data.max_audio_seconds)
    train = data.train
    if cfg.data.streaming:  # an ASRStream: numpy examples already; marks its own rows for augmentation
        train.augment = augment is not None
    else:
        if augment is not None:  # the collator augments only rows marked so: evaluation data stays as it is
            train = train.add_column("augment", [True] * len(train))
        train = train.with_format("numpy")
    return Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=data.eval.with_format("numpy") if data.eval is not None else None,
        data_collator=WhisperCollator(decoder_start_token_id=model.config.decoder_start_token_id, frames_major=True,
                                      pad_token_id=model.config.pad_token_id,
                                      label_multiple=8 if cfg.train.compile_layers else 1,
                                      feature_extractor=data.processor.feature_extractor, trim=cfg.whisper.trim_audio,
                                      augment=augment),
        compute_loss_func=functools.partial(token_mean_loss, label_smoothing=cfg.train.label_smoothing),
        processing_class=data.processor.feature_extractor,
        compute_metrics=compute_metrics_for(cfg, data.processor),
        callbacks=callbacks,
    )


def _card_notes(cfg) -> list:
    w = cfg.whisper
    return [f"| Whisper | language {w.language}, task {w.task}, timestamps {w.timestamps}, "
            f"short-clip mode (trim_audio) {w.trim_audio} |"]


def _apply_speed(model, cfg):
    from loratune.asr.speed import apply_training_speed  # core switches + the Whisper hooks

    return apply_training_speed(model, cfg)


WING = Wing(task="asr", prepare=_prepare, build_model=_build_model, make_trainer=_make_trainer, card_notes=_card_notes,
            apply_speed=_apply_speed)


def train(cfg) -> Dict[str, Any]:
    """Run one Whisper fine-tune as configured; returns the summary dict (also in ``summary.json``)."""
    return run_training(cfg, WING)
