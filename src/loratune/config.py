"""Typed run configuration: the single source of every option and its help text.

A run is described by one YAML recipe (``configs/*.yaml``) plus ``key=value`` overrides on the
command line, e.g.::

    loratune train configs/whisper-base-hsk-qlora.yaml train.epochs=2 lora.r=16

Each field's help is the docstring written under it; ``loratune train --help`` prints them.
Loading, merging and type checking go through OmegaConf's structured configs (unknown keys and
wrong types are refused there), so this module only declares the schema and adds the help text.
"""
from __future__ import annotations

import ast
import inspect
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from loratune.config_sections import (  # noqa: F401  (re-exported: the sections are part of this API)
    AugmentSection,
    DataSection,
    LoraSection,
    ModelSection,
    QuantSection,
    SFTSection,
    TrainSection,
    WhisperSection,
)
from loratune.config_use_sections import (  # noqa: F401  (re-exported, as above)
    ConvertSection,
    EvalSection,
    ExportSection,
    GenerateSection,
    MergeSection,
    RescoreSection,
    ServeSection,
    TranscribeSection,
)
from loratune.errors import ConfigError


@dataclass
class RunConfig:
    """One loratune run: task, model, data and every knob of training and inference."""

    task: str = "asr"
    """``asr`` (Whisper speech recognition) or ``sft`` (causal-LM supervised fine-tuning)."""
    model: ModelSection = field(default_factory=ModelSection)
    quant: QuantSection = field(default_factory=QuantSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    whisper: WhisperSection = field(default_factory=WhisperSection)
    augment: AugmentSection = field(default_factory=AugmentSection)
    sft: SFTSection = field(default_factory=SFTSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    transcribe: TranscribeSection = field(default_factory=TranscribeSection)
    rescore: RescoreSection = field(default_factory=RescoreSection)
    merge: MergeSection = field(default_factory=MergeSection)
    serve: ServeSection = field(default_factory=ServeSection)
    generate: GenerateSection = field(default_factory=GenerateSection)
    convert: ConvertSection = field(default_factory=ConvertSection)
    export: ExportSection = field(default_factory=ExportSection)


# --------------------------------------------------------------------------------------------
# loading, overrides, validation


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[List[str]] = None) -> RunConfig:
    """Read a YAML recipe (optional), apply ``key=value`` overrides, type-check, validate."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = OmegaConf.structured(RunConfig)
    layers = [schema]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found; pass a YAML from configs/ or omit it")
        try:
            recipe = OmegaConf.load(p)
        except Exception as exc:  # yaml.YAMLError and friends: one line, where and what
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"{p}{where}: not valid YAML ({what}); fix the file") from exc
        if not OmegaConf.is_dict(recipe):  # e.g. a file that is a YAML list (`- x`): found by hypothesis
            raise ConfigError(f"{p}: a recipe is a mapping of sections (model:, data:, train: ...), not a "
                              f"{type(recipe).__name__}; see configs/ for examples")
        layers.append(recipe)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=2)")

    def fail(exc, where: str):
        key = getattr(exc, "full_key", None) or ""
        msg = str(exc).splitlines()[0]
        return ConfigError(f"{where}: config key {key!r}: {msg}; see `loratune train --help` for valid keys")

    try:  # the recipe alone first, so a bad key is blamed on the file or on the command line, not both
        merged = OmegaConf.merge(*layers)
    except OmegaConfBaseException as exc:
        raise fail(exc, str(path)) from exc
    for item in overrides or []:  # a value YAML cannot read (`train.epochs=[`) is named, not a traceback
        try:
            OmegaConf.from_dotlist([item])
        except OmegaConfBaseException:
            pass  # reported with its key below
        except Exception as exc:  # yaml errors
            what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({what}); quote it or fix it") from exc
    try:
        if overrides:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise fail(exc, "command line" if overrides else str(path)) from exc
    validate(cfg)
    return cfg


_CHOICES = {
    "task": ("asr", "sft"),
    "quant.bits": (0, 4, 8),
    "quant.quant_type": ("nf4", "fp4"),
    "quant.compute_dtype": ("float16", "bfloat16", "float32"),
    "lora.bias": ("none", "all", "lora_only"),
    "lora.init": ("default", "gaussian", "pissa", "olora"),
    "whisper.task": ("transcribe", "translate"),
    "data.features": ("log_mel", "audio"),
    "whisper.metric": ("auto", "cer", "wer"),
    "sft.template": ("auto", "chat", "instruction"),
    "sft.too_long": ("truncate", "drop"),
    "train.eval_strategy": ("epoch", "steps", "no"),
    "merge.dtype": ("float32", "float16", "bfloat16"),
    "convert.dtype": ("float32", "float16", "bfloat16"),
    "export.format": ("ctranslate2",),
    "export.quantization": ("float16", "int8_float16", "int8", "int8_float32", "bfloat16", "float32"),
    "train.frozen_dtype": (None, "float32", "float16", "bfloat16"),
    "model.sdpa_backend": (None, "cudnn", "flash", "efficient"),
    "transcribe.backend": ("auto", "ctranslate2", "transformers"),
    "rescore.dtype": ("bfloat16", "float32"),
    "transcribe.long_form": ("auto", "sequential", "batched", "vad"),
    "eval.backend": ("transformers", "ctranslate2"),
}


def get_key(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: RunConfig) -> None:
    """Cross-field checks OmegaConf cannot express; each failure is one actionable line."""
    if cfg.train.eval_strategy in ("False", "false"):  # YAML 1.1 reads a bare `no` as false
        cfg.train.eval_strategy = "no"
    for key, allowed in _CHOICES.items():
        value = get_key(cfg, key)
        if value not in allowed:
            names = ", ".join("null" if a is None else str(a) for a in allowed)
            raise ConfigError(f"config key {key!r} = {value!r}; choose one of {names}")
    if cfg.lora.r <= 0 or cfg.lora.alpha <= 0:
        raise ConfigError("lora.r and lora.alpha must be positive")
    if not cfg.lora.target_modules:
        raise ConfigError("lora.target_modules is empty; name at least one module (e.g. [q_proj, v_proj])")
    if not 0.0 < cfg.data.eval_ratio < 1.0:
        raise ConfigError(f"data.eval_ratio = {cfg.data.eval_ratio}; must lie strictly between 0 and 1")
    if cfg.train.fp16 and cfg.train.bf16:
        raise ConfigError("train.fp16 and train.bf16 are both true; pick one")
    if cfg.train.eval_strategy == "steps" and not cfg.train.eval_steps:
        raise ConfigError("train.eval_strategy=steps needs train.eval_steps")
    if cfg.train.metric_for_best_model in ("eval_cer", "eval_wer") and not cfg.train.generate_during_eval:
        raise ConfigError(f"train.metric_for_best_model={cfg.train.metric_for_best_model} needs train.generate_during_eval=true")
    if cfg.train.early_stopping_patience is not None and cfg.train.eval_strategy == "no":
        raise ConfigError("train.early_stopping_patience needs evaluation: set train.eval_strategy to epoch or steps")
    _check_numbers(cfg)


# key -> (test, what it must be); checked for every verb before any work
_NUMBERS = {
    "train.lr": (lambda v: v > 0, "a positive number, e.g. 1e-4"),
    "train.batch_size": (lambda v: v >= 1, "at least 1"),
    "train.grad_accum": (lambda v: v >= 1, "at least 1"),
    "train.weight_decay": (lambda v: v >= 0, "0 or more"),
    "train.warmup_epochs": (lambda v: v >= 0, "0 or more"),
    "train.warmup_steps": (lambda v: v >= 0, "0 or more"),
    "train.max_grad_norm": (lambda v: v >= 0, "0 or more (0 = no clipping)"),
    "train.logging_steps": (lambda v: v >= 1, "at least 1"),
    "train.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "train.checkpoint_fraction": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "train.num_workers": (lambda v: v >= 0, "0 or more"),
    "lora.dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.max_audio_seconds": (lambda v: v > 0, "a positive number of seconds"),
    "data.num_proc": (lambda v: v >= 1, "at least 1"),
    "data.shuffle_buffer": (lambda v: v >= 0, "0 or more examples (0 = no shuffling)"),
    "eval.batch_size": (lambda v: v >= 1, "at least 1"),
    "transcribe.batch_size": (lambda v: v >= 1, "at least 1"),
    "transcribe.chunk_seconds": (lambda v: 1 <= v <= 30, "between 1 and 30 seconds (a chunk is decoded as one Whisper window)"),
    "transcribe.merge_seconds": (lambda v: 0 <= v <= 30, "between 0 (no merging) and 30 seconds"),
    "whisper.generation_max_length": (lambda v: 1 <= v <= 448, "between 1 and 448 (Whisper's decoder positions)"),
    "whisper.num_beams": (lambda v: v >= 1, "at least 1"),
    "rescore.hypotheses": (lambda v: v >= 2, "at least 2 (one hypothesis leaves nothing to choose)"),
    "rescore.lm_weight": (lambda v: v >= 0, "0 or more"),
    "rescore.batch_size": (lambda v: v >= 1, "at least 1"),
    "whisper.mask_time_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "whisper.mask_feature_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "augment.gain_db": (lambda v: 0 <= v <= 40, "between 0 and 40 dB"),
    "augment.noise_prob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}


def _check_numbers(cfg: RunConfig) -> None:
    for key, (ok, what) in _NUMBERS.items():
        value = get_key(cfg, key)
        if value is not None and not ok(value):
            raise ConfigError(f"{key}={value}: must be {what}")
    t = cfg.train
    if t.max_steps <= 0 and t.epochs <= 0:
        raise ConfigError(f"train.epochs={t.epochs:g} trains nothing; give a positive number of epochs (or train.max_steps > 0)")
    if t.max_steps == 0 or t.max_steps < -1:
        raise ConfigError(f"train.max_steps={t.max_steps}: must be a positive step count, or -1 to use train.epochs")
    if t.threads is not None and t.threads < 1:
        raise ConfigError(f"train.threads={t.threads}: must be at least 1 (or null for PyTorch's default)")
    for key in ("speeds", "tempos"):
        factors = list(getattr(cfg.augment, key))
        if any(not 0.5 <= f <= 2.0 for f in factors):
            raise ConfigError(f"augment.{key}={factors}: factors must lie in [0.5, 2.0], e.g. [0.9, 1.0, 1.1]")
    from loratune.asr.augment import AudioAugment  # one rule for "does augment change anything"

    augmenting = AudioAugment.from_config(cfg.augment) is not None
    if augmenting and cfg.task == "asr" and cfg.data.features != "audio" and not cfg.data.streaming:
        raise ConfigError("augment.* changes the audio every epoch, which cached log-mels cannot show: "
                          "set data.features=audio (the cache then holds decoded audio)")
    _check_streaming(cfg)
    if cfg.task == "asr" and cfg.data.max_audio_seconds > 30:
        raise ConfigError(f"data.max_audio_seconds={cfg.data.max_audio_seconds:g}: Whisper trains on at most 30 s per example "
                          "(longer clips would be cut while their whole transcript is kept); set 30 or less, or split long clips")


def _check_streaming(cfg: RunConfig) -> None:
    """A stream has no length: every option that needs the corpus size is refused with its fix."""
    d, t = cfg.data, cfg.train
    if d.eval_parquet and not d.parquet:
        raise ConfigError("data.eval_parquet needs data.parquet (the training shards)")
    if not d.streaming:
        return
    why = "data.streaming=true: a stream has no length, so"
    if not (d.hub or d.parquet) or d.csv or d.disk or d.jsonl:
        raise ConfigError("data.streaming=true reads data.parquet or data.hub only; a CSV / save_to_disk / JSON-lines "
                          "source is checked and cached up front: drop data.streaming, or convert it to parquet shards")
    if t.max_steps <= 0:
        raise ConfigError(f"{why} train.max_steps must say how many optimiser steps to run (e.g. train.max_steps=2000)")
    if t.warmup_epochs > 0:
        raise ConfigError(f"{why} train.warmup_epochs={t.warmup_epochs:g} cannot be counted: "
                          "set train.warmup_epochs=0 and train.warmup_steps=N")
    if t.eval_strategy == "epoch":
        raise ConfigError(f"{why} there are no epochs to evaluate after: set train.eval_strategy=steps train.eval_steps=N "
                          "(checkpoints follow evaluations) or train.eval_strategy=no")
    if t.group_by_length:
        raise ConfigError(f"{why} train.group_by_length cannot sort it: set train.group_by_length=false")


def to_yaml(cfg: RunConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, directory: str | os.PathLike, name: str = "loratune_config.yaml") -> Path:
    """Write the resolved config next to an output, atomically (temp file + rename)."""
    from loratune.core.atomic import write_text

    return write_text(Path(directory) / name, to_yaml(cfg))


# --------------------------------------------------------------------------------------------
# help text from the attribute docstrings


def field_docs(cls: type) -> Dict[str, str]:
    """Map field name -> the docstring written under it in the class body."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: Dict[str, str] = {}
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[stmt.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def plain_text(text: str) -> str:
    """Docstring reST for a terminal: ``x`` and :mod:`x` become `x`."""
    import re

    text = re.sub(r":[a-z]+:`([^`]+)`", r"`\1`", text)
    return text.replace("``", "`")


def options_help(cls: type = RunConfig, prefix: str = "", sections: Optional[Sequence[str]] = None) -> List[str]:
    """One line per option: ``key (type, default; one of ...): help`` — printed by ``--help``.

    ``sections``: the top-level fields a verb reads (its module's ``SECTIONS``); None = all."""
    lines: List[str] = []
    docs = field_docs(cls)
    defaults = cls()
    for f in fields(cls):
        if sections is not None and not prefix and f.name not in sections:
            continue
        value = getattr(defaults, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            lines.append(f"\n[{key}] {plain_text((inspect.getdoc(type(value)) or '').splitlines()[0])}")
            lines.extend(options_help(type(value), prefix=key + "."))
        else:
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            shown = "null" if value is None else repr(value)
            choices = _CHOICES.get(key)
            allowed = f"; one of: {', '.join('null' if c is None else str(c) for c in choices)}" if choices else ""
            lines.append(f"  {key} ({type_name}, default {shown}{allowed}): {plain_text(docs.get(f.name, ''))}")
    return lines
