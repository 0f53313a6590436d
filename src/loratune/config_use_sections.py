"""The sections of the verbs that use a trained model: ``eval``, ``generate``, ``transcribe``,
``rescore``, ``merge``, ``serve``, ``convert``, ``export`` (the training ones are in
:mod:`loratune.config_sections`).

Each field's help text is the docstring written under it: ``loratune VERB --help`` prints them.
The top-level :class:`loratune.config.RunConfig` gathers these sections.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


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
    cache_base: bool = True
    """Whisper: reuse the base row of an earlier run when the base, test set, decoding options and package
    versions are all the same (``<cache root>/eval-base``; the base's 30-s input is the slow part); false
    scores it again."""
    backend: str = "transformers"
    """Whisper: ``transformers`` (the reference, with ``quant.*`` as trained) or ``ctranslate2`` (the
    deployment path: the cached CT2 copy at ``transcribe.compute_type``)."""
    max_new_tokens: int = 128
    """LLM evaluation: most tokens generated per example."""
    forgetting: bool = True
    """Whisper adapters: also transcribe the shipped general set (English sentences, each with its own
    language) with base and adapter, and report the WER of both (what fine-tuning forgot)."""
    long_form: bool = True
    """Whisper adapters: also transcribe two 2-minute files joined from the test clips through the
    long-form path ``transcribe.long_form`` picks; report its CER next to the same clips' clip-by-clip
    CER and whether timestamps increase (fine-tuning on short clips broke long files once)."""
    max_cer: Optional[float] = None
    """Gate: exit with code 3 when the adapter's CER is above this (null = report only)."""
    max_wer: Optional[float] = None
    """Gate: the same for WER."""
    max_insertion_rate: Optional[float] = None
    """Gate: inserted units / reference units."""
    max_loop_rate: Optional[float] = None
    """Gate: share of outputs with a repetition loop the reference lacks."""
    max_long_rate: Optional[float] = None
    """Gate: share of outputs over twice the reference length."""
    max_empty_rate: Optional[float] = None
    """Gate: share of empty outputs for non-empty references."""
    max_forgetting_wer_increase: Optional[float] = None
    """Gate: adapter WER minus base WER on the general set (``eval.forgetting``)."""
    max_long_form_cer_gap: Optional[float] = None
    """Gate: long-form CER minus clip-by-clip CER (``eval.long_form``)."""


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
    backend: str = "auto"
    """``auto`` (ctranslate2 without a CUDA GPU, transformers with one: measured faster on each, see the
    README), ``ctranslate2`` (base + adapter merged and converted once, cached by content; int8 on CPU)
    or ``transformers`` (PyTorch, with ``quant.*``); also used by ``serve``."""
    compute_type: str = "auto"
    """ctranslate2 backend: weight/compute type; ``auto`` = int8 on CPU, int8_float16 on GPU."""
    cpu_threads: int = 0
    """ctranslate2 backend: CPU threads (0 = all cores)."""
    long_form: str = "auto"
    """Files over 30 s: ``vad`` (Silero VAD cuts the file at pauses into chunks of at most
    ``chunk_seconds``, decoded like short clips; both backends), ``sequential`` (Whisper's 30-s window
    loop with timestamp tokens), ``batched`` (ctranslate2 only: faster-whisper's BatchedInferencePipeline).
    ``auto``: ``vad`` for an adapter trained in short-clip mode (``whisper.trim_audio=true``), which
    breaks in the 30-s loop (long-form CER 0.201 vs 0.062 on HSK dev), ``sequential`` otherwise."""
    chunk_seconds: float = 10.0
    """``long_form=vad``: longest chunk; the VAD cuts longer speech at its longest pause (or at the limit)."""
    merge_seconds: float = 0.0
    """``long_form=vad``: merge neighbouring speech spans while a chunk stays this short (0 = every pause
    of 0.3 s ends a chunk). 0 for adapters trained on one sentence a clip: merged up to 5 s, the HSK
    adapter dropped whole sentences (2-minute dev files: CER 0.123 against 0.046)."""
    vad: bool = False
    """ctranslate2 backend: Silero VAD filter (as faster-whisper ships it) for long files / timestamped output."""
    word_timestamps: bool = False
    """ctranslate2 backend: word-level timestamps in the json output (``segments[].words``)."""


@dataclass
class RescoreSection:
    """Whisper n-best rescoring with a causal LM (``asr/rescore.py``): transcribe, evaluate, serve."""

    lm: Optional[str] = None
    """Causal LM that re-ranks each clip's n-best list (``gemma3-270m`` = the packaged Gemma 3 270M, a Hub
    id, a directory or a .gguf file); null = off. HSK dev: CER 0.0555 greedy -> 0.0250 (ACCURACY.md rows R1, R2)."""
    hypotheses: int = 5
    """Beam width and n-best size used when rescoring (it replaces ``whisper.num_beams``)."""
    lm_weight: float = 0.5
    """Weight of the LM's log-probability against Whisper's: 0 keeps Whisper's own choice."""
    length_bonus: float = 0.5
    """Score added per output character (whitespace not counted): offsets the LM's liking for short texts."""
    batch_size: int = 16
    """Candidate texts per LM forward pass (small batches keep the vocabulary-wide logits small)."""
    dtype: str = "bfloat16"
    """LM weights: ``bfloat16`` (faster on CPUs with AVX512-BF16 and on GPUs) or ``float32`` (exact)."""


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
    token: Optional[str] = None
    """API token: requests to /api/* need ``Authorization: Bearer TOKEN`` (401 otherwise); also read
    from ``LORATUNE_SERVE_TOKEN``. Required when ``host`` is not a loopback address."""


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
