"""The one training sequence both wings run (Whisper ASR and causal-LM SFT).

    from loratune.core.training import run_training
    summary = run_training(cfg, wing)     # wing: loratune.asr.train.WING or loratune.llm.train.WING

Order of work, the same for every task, so that every input error stops the run before the first
optimiser step and nothing already trained is replaced by accident:

1. device check (bf16 / flex attention where they cannot run), CPU threads;
2. output folder and ``--resume`` rules (:func:`resume_checkpoint`): ``--resume`` without a complete
   checkpoint is an error (the stricter of the two rules the trainers used to have);
3. the wing's data: processor/tokenizer, train and eval datasets, every row checked;
4. seed, then the wing's model with LoRA attached; the speed switches (``train.*``) applied here
   for both tasks, their report kept in summary.json under ``speed``;
5. callbacks: the steady-speed timer, early stopping (``train.early_stopping_patience`` needs
   ``train.load_best_model_at_end``: an error otherwise, never a silently dropped callback);
6. the wing's Trainer, ``train()``;
7. rank 0 only (under DDP): adapter + processor written atomically (temp folder, then renamed into
   place, the weights last), ``loratune_config.yaml``, ``loss.png`` (per-step training loss with the
   evaluation points), ``summary.json`` (one schema), ``README.md`` (a model card).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from loratune.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What a wing's data step hands to the skeleton."""

    processor: Any                      # saved beside the adapter (Whisper processor / tokenizer)
    train: Any                          # datasets.Dataset
    eval: Any = None                    # datasets.Dataset or None
    report: Dict[str, Any] = field(default_factory=dict)  # train_rows, eval_rows, skipped, ... (summary.json)


@dataclass
class Wing:
    """The task-specific steps; everything else is :func:`run_training`'s."""

    task: str
    prepare: Callable[[Any], Prepared]                          # cfg -> Prepared
    build_model: Callable[[Any], Any]                           # cfg -> model with LoRA attached
    make_trainer: Callable[[Any, Any, Prepared, List[Any]], Any]  # cfg, model, data, callbacks -> Trainer
    card_notes: Callable[[Any], List[str]] = lambda cfg: []     # extra lines for the model card
    apply_speed: Optional[Callable[[Any, Any], Dict[str, Any]]] = None  # model, cfg -> report; None = core's


# what a resumed run must share with the run that wrote the checkpoint (anything else changes
# the result); train.epochs / max_steps may grow, to continue a run for longer
RESULT_KEYS = ("task", "model.name", "model.gguf_file", "quant", "lora", "data", "whisper.language", "whisper.task",
               "whisper.timestamps", "whisper.trim_audio", "whisper.spec_augment", "whisper.mask_time_prob",
               "whisper.mask_feature_prob", "sft", "train.lr", "train.batch_size", "train.grad_accum", "train.optim",
               "train.scheduler", "train.warmup_epochs", "train.warmup_steps", "train.weight_decay", "train.seed",
               "train.max_grad_norm", "train.label_smoothing")
NOT_RESULT = ("data.num_proc", "data.cache_dir", "data.max_eval_samples")
FINAL_FILES = ("adapter_model.safetensors", "adapter_config.json", "summary.json", "loss.png", "README.md")


def _flat(obj, prefix: str = "") -> Dict[str, Any]:
    from dataclasses import fields, is_dataclass

    if not is_dataclass(obj):
        return {prefix: obj}
    out: Dict[str, Any] = {}
    for f in fields(obj):
        out.update(_flat(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name))
    return out


def config_differences(old, new) -> List[str]:
    """Keys of RESULT_KEYS whose values differ between two run configs."""
    a, b = _flat(old), _flat(new)
    keys = [k for k in b if any(k == r or k.startswith(r + ".") for r in RESULT_KEYS) and k not in NOT_RESULT]
    return [f"{k} ({a.get(k)!r} -> {b[k]!r})" for k in keys if a.get(k) != b[k]]


def _leftovers(out: Path) -> List[str]:
    found = sorted(p.name for p in out.glob("checkpoint-*") if p.is_dir())
    return found + (["adapter_model.safetensors"] if (out / "adapter_model.safetensors").exists() else [])


def resume_checkpoint(cfg) -> Optional[Path]:
    """The checkpoint ``--resume`` continues from (None for a fresh run), after the output-folder
    rules; ConfigError (one line, before any work) when:

    - the output path is a file;
    - a fresh run meets checkpoints or a finished adapter of an earlier run (``--resume`` continues
      it; ``train.overwrite=true`` deletes them first);
    - ``--resume`` finds no complete checkpoint, or the earlier run's config differs in a key that
      changes the result (named), or its checkpoint is already at or past ``train.max_steps``.
    """
    from loratune.config import load_config
    from loratune.core.trainer_args import last_complete_checkpoint

    out = Path(cfg.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir={out} is a file; give a folder")
    if not cfg.train.resume:
        old = _leftovers(out) if out.is_dir() else []
        if old and not cfg.train.overwrite:
            raise ConfigError(f"train.output_dir={out} holds an earlier run ({', '.join(old[:4])}{' ...' if len(old) > 4 else ''}); "
                              "continue it with --resume, pick another folder, or set train.overwrite=true to delete it first")
        if old and int(os.environ.get("RANK", "0")) == 0:  # under DDP one rank deletes
            _clear_run(out)
        return None
    ckpt = last_complete_checkpoint(out)
    if ckpt is None:
        raise ConfigError(f"train.resume=true but {out} has no complete checkpoint-* folder; drop --resume to start fresh")
    saved = out / "loratune_config.yaml"
    if saved.is_file():
        diff = config_differences(load_config(saved), cfg)
        if diff:
            raise ConfigError(f"--resume: {ckpt.name} was trained with other settings: {'; '.join(diff)}; "
                              "resume with the same settings, or start a new run in another folder")
    step = int(ckpt.name.split("-")[1])
    if 0 < cfg.train.max_steps <= step:
        raise ConfigError(f"--resume: {ckpt.name} is already at step {step} >= train.max_steps={cfg.train.max_steps}; nothing to train")
    log.info("resuming from %s", ckpt)
    return ckpt


def _clear_run(out: Path) -> None:
    """train.overwrite: remove an earlier run's checkpoints and final outputs (not other files)."""
    for p in out.glob("checkpoint-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    for name in FINAL_FILES:
        (out / name).unlink(missing_ok=True)
    log.info("train.overwrite: removed the earlier run's checkpoints and outputs in %s", out)


def training_callbacks(cfg, load_best_model_at_end: bool) -> List[Any]:
    """The steady-speed timer, and early stopping where it can work (else a ConfigError)."""
    from transformers import EarlyStoppingCallback

    from loratune.core.reporting import step_timer

    callbacks = [step_timer()]
    if cfg.train.early_stopping_patience is not None:
        if not load_best_model_at_end:
            raise ConfigError("train.early_stopping_patience needs train.load_best_model_at_end=true "
                              "(and an evaluation split with train.eval_strategy steps or epoch)")
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    return callbacks


def save_final(trainer, processor, out: Path, base_id: str) -> None:
    """Adapter + processor into ``out``, atomically: written to a temp folder beside it, then each
    file renamed into place with the adapter weights last, so a kill never leaves a truncated
    ``adapter_model.safetensors`` (and a present one always belongs to the other files)."""
    model = trainer.model
    for peft_cfg in getattr(model, "peft_config", {}).values():
        peft_cfg.base_model_name_or_path = base_id  # shareable, never a path inside a cache
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=".final.tmp-"))
    try:
        # PEFT: the adapter only. save_embedding_layers=False: loratune never adapts embeddings, and
        # PEFT's "auto" check would fetch the base's config by its public id (a warning offline)
        model.save_pretrained(tmp, safe_serialization=True, save_embedding_layers=False)
        processor.save_pretrained(tmp)
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == "adapter_model.safetensors")
        for f in files:
            dest = out / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            f.replace(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _summary(cfg, trainer, result, prepared: Prepared, started: float, resumed_from: Optional[Path], base_id: str,
             speed: Dict[str, Any]) -> Dict[str, Any]:
    from loratune.core.reporting import epoch_losses, peak_memory_gb

    state = trainer.state
    best_epoch = None
    if state.best_global_step:
        for entry in state.log_history:
            if entry.get("step") == state.best_global_step and cfg.train.metric_for_best_model in entry:
                best_epoch = entry.get("epoch")
    evals = [h for h in state.log_history if "eval_loss" in h]
    metrics = result.metrics if result is not None else {}
    report = prepared.report
    return {
        "task": cfg.task,
        "base_model": base_id,
        "quant_bits": cfg.quant.bits,
        "output_dir": str(Path(cfg.train.output_dir).resolve()),
        "metric_for_best_model": cfg.train.metric_for_best_model,
        "best_metric": state.best_metric,
        "best_epoch": best_epoch,
        "best_checkpoint": state.best_model_checkpoint,
        "epochs_run": round(state.epoch or 0.0, 3),
        "global_step": state.global_step,
        "resumed_from_step": int(resumed_from.name.split("-")[1]) if resumed_from else None,
        "wall_time_s": round(time.time() - started, 1),
        "train_runtime_s": metrics.get("train_runtime"),
        "train_samples_per_second": metrics.get("train_samples_per_second"),
        "train_loss": metrics.get("train_loss"),
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "train_examples": report.get("train_rows"),
        "eval_examples": report.get("eval_rows"),
        "skipped_rows": sum(report.get("skipped", {}).values()),
        "skipped_by_reason": report.get("skipped", {}),
        "loss_per_epoch": epoch_losses(state.log_history),
        # every logged training loss (train.logging_steps apart): compares runs step by step, e.g. 1 vs N GPUs
        "train_loss_log": [[h["step"], h["loss"]] for h in state.log_history if "loss" in h and "step" in h],
        "speed": speed,
        **{k: v for k, v in report.items() if k not in ("train_rows", "eval_rows", "skipped")},
        **peak_memory_gb(),
        **(getattr(trainer.model, "loratune_report", {}) or {}),
    }


def run_training(cfg, wing: Wing) -> Dict[str, Any]:
    """Run one fine-tune as configured; returns the summary (also in ``summary.json``)."""
    import torch
    from transformers import set_seed

    from loratune.config import save_config
    from loratune.core.atomic import write_json
    from loratune.core.model_card import write_model_card
    from loratune.core.names import public_id
    from loratune.core.reporting import format_summary, plot_losses
    from loratune.core.speed import apply_training_speed, check_device_support
    from loratune.core.trainer_args import samples_per_step

    check_device_support(cfg)  # bf16 / flex attention on a device that cannot run them: stop now
    started = time.time()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.train.output_dir)
    resume_from = resume_checkpoint(cfg)

    prepared = wing.prepare(cfg)  # every data error surfaces here, before the model loads
    if prepared.eval is None and cfg.train.eval_strategy != "no":
        raise DataError("no validation rows (the eval split is empty or every row was skipped); "
                        "set data.eval_split / data.eval_ratio, or train.eval_strategy=no")
    set_seed(cfg.train.seed)  # LoRA A matrices are random: same seed, same adapter init (DDP ranks agree)
    model = wing.build_model(cfg)
    speed = (wing.apply_speed or apply_training_speed)(model, cfg)  # off unless train.* speed options are set
    callbacks = training_callbacks(cfg, bool(cfg.train.load_best_model_at_end and prepared.eval is not None
                                             and cfg.train.eval_strategy != "no"))
    trainer = wing.make_trainer(cfg, model, prepared, callbacks)
    base_id = public_id(cfg.model.name)
    rank0 = trainer.is_world_process_zero()
    if rank0:
        save_config(cfg, out)  # written first, so a crashed run still says what it was
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)

    summary = _summary(cfg, trainer, result, prepared, started, resume_from, base_id, speed)
    summary.update(callbacks[0].report(samples_per_step(cfg.train)))
    if summary.get("first_step_unix"):  # data preparation + model load + the first step (streaming: no cache build)
        summary["time_to_first_step_s"] = round(summary["first_step_unix"] - started, 1)
    if rank0:  # under DDP only rank 0 writes
        save_final(trainer, prepared.processor, out, base_id)
        plot_losses(trainer.state.log_history, out / "loss.png", title=f"{Path(base_id).name}: {cfg.task} training loss")
        write_json(out / "summary.json", summary)
        write_model_card(cfg, summary, out, wing.card_notes(cfg))
        print(format_summary(summary), flush=True)
    return summary
