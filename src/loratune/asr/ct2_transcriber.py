"""The ``ctranslate2`` backend: the same ``Transcriber`` interface, run by CTranslate2 / faster-whisper.

    loratune transcribe clips/ model.adapter=outputs/whisper-base-hsk-qlora transcribe.backend=ctranslate2
    from loratune.asr.ct2_transcriber import CT2Transcriber
    t = CT2Transcriber.from_config(cfg)      # builds/reuses the cached CT2 copy (asr/ct2_model.py)
    print(t([audio_16k])[0].text)

Clips up to 30 s are decoded in batches with ``ctranslate2.models.Whisper.generate`` (clips sorted
by length, ``transcribe.batch_size`` per call). With ``whisper.trim_audio`` (an adapter trained in
short-clip mode) the encoder gets only the batch's longest clip in log-mel frames instead of 3000:
the features are computed by the model's own ``WhisperFeatureExtractor`` on the audio zero-padded to
that length plus 400 samples, which gives exactly the first frames of the 30-s features (an STFT
frame sees 200 samples either side; the padding frames stay at the floor value, so the per-clip
maximum used for normalisation is the same). Files over 30 s, and every file when
``transcribe.word_timestamps`` or ``whisper.timestamps`` asks for timestamps, go through
faster-whisper's ``WhisperModel.transcribe`` on the same loaded model (sequential windows, as
loratune's transformers path: no conditioning on the previous window, temperature 0), or its
``BatchedInferencePipeline`` with ``transcribe.long_form=batched`` (Silero VAD chunks decoded
``transcribe.batch_size`` at a time). ``transcribe.vad`` turns the Silero VAD filter on for them.
``transcribe.long_form=vad`` (the default for short-clip adapters) cuts long files at pauses and
decodes the chunks on the short-clip path above (``asr/longform.py``).

Tests: ``python -m pytest -q tests/test_ct2_backend.py``.
"""
from __future__ import annotations

import logging
import math
import os
from typing import List, Optional, Sequence

import numpy as np

from loratune.asr.longform import join_texts, longest_clip_seconds, transcribe_at_pauses
from loratune.asr.transcriber import WINDOW_SECONDS, Segment, Transcript
from loratune.core.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

HOP = 160
FULL_FRAMES = 3000


def trimmed_features(fe, audios: Sequence[np.ndarray], frames: int) -> np.ndarray:
    """``(batch, mels, frames)`` log-mels equal to the first ``frames`` of each clip's 30-s features."""
    length = frames * HOP + 400  # the STFT of frame t sees samples t*160 +- 200: all of them zero-padded as at 30 s
    padded = np.zeros((len(audios), length), np.float32)
    for i, a in enumerate(audios):
        n = min(len(a), length)
        padded[i, :n] = a[:n]
    feats = fe(list(padded), sampling_rate=SAMPLE_RATE, return_tensors="np", padding="longest", truncation=False).input_features
    return np.ascontiguousarray(feats[..., :frames], dtype=np.float32)


def full_features(fe, audios: Sequence[np.ndarray]) -> np.ndarray:
    """Whisper's native input: every clip padded to 30 s (3000 frames)."""
    return np.ascontiguousarray(fe(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="np").input_features, dtype=np.float32)


class CT2Transcriber:
    """Batched Whisper transcription on CTranslate2; same call and results as ``Transcriber``."""

    def __init__(self, model_dir, processor=None, language: Optional[str] = None, task: str = "transcribe", num_beams: int = 1,
                 timestamps: bool = False, trim_audio: bool = False, no_repeat_ngram_size: int = 0,
                 max_tokens_per_second: Optional[float] = None, device: str = "cpu", compute_type: str = "int8",
                 cpu_threads: int = 0, batch_size: int = 16, vad: bool = False, word_timestamps: bool = False,
                 long_form: str = "sequential", chunk_seconds: float = 10.0, merge_seconds: float = 0.0, rescorer=None):
        from faster_whisper import WhisperModel
        from transformers import WhisperProcessor

        # one loaded model: faster-whisper's wrapper owns it, the short-clip path calls it directly
        self.fw = WhisperModel(str(model_dir), device=device, compute_type=compute_type, cpu_threads=cpu_threads or (os.cpu_count() or 1))
        self.model = self.fw.model
        self.processor = processor or WhisperProcessor.from_pretrained(str(model_dir))
        self.tokenizer = self.processor.tokenizer
        self.language, self.task, self.num_beams, self.timestamps = language, task, num_beams, timestamps
        self.trim_audio, self.no_repeat_ngram_size, self.max_tokens_per_second = trim_audio, no_repeat_ngram_size, max_tokens_per_second
        self.batch_size, self.vad, self.word_timestamps, self.long_form = max(1, batch_size), vad, word_timestamps, long_form
        self.compute_type, self.model_dir, self.chunk_seconds = compute_type, str(model_dir), chunk_seconds
        self.merge_seconds = merge_seconds
        self.rescorer = rescorer  # asr/rescore.LMRescorer, short clips and VAD chunks only
        self._batched = None

    @classmethod
    def from_config(cls, cfg, adapter: Optional[str] = "config", trim_audio: Optional[bool] = None, rescorer="config") -> "CT2Transcriber":
        """Build (or reuse) the CT2 copy of ``cfg.model`` and load it. ``adapter=None``: the base alone;
        ``rescorer``: an already loaded ``LMRescorer`` (or None) instead of the one ``cfg.rescore`` asks for."""
        import ctranslate2

        from loratune.asr.ct2_model import compute_type_for, ct2_model_dir
        from loratune.core.loading import check_language, load_processor

        language = check_language(cfg.whisper.language)
        adapter = cfg.model.adapter if adapter == "config" else adapter
        device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        t = cfg.transcribe
        compute_type = compute_type_for(device, t.compute_type)
        model_dir = ct2_model_dir(cfg.model.name, adapter, compute_type)
        from loratune.asr.longform import resolve_long_form
        from loratune.asr.rescore import LMRescorer

        w = cfg.whisper
        trim = w.trim_audio if trim_audio is None else trim_audio
        return cls(model_dir, load_processor(cfg.model.name, adapter, "asr"), language, w.task, w.num_beams, w.timestamps,
                   trim, w.no_repeat_ngram_size, w.max_tokens_per_second, device, compute_type, t.cpu_threads, t.batch_size,
                   t.vad, t.word_timestamps, resolve_long_form(t.long_form, trim), t.chunk_seconds, t.merge_seconds,
                   LMRescorer.from_config(cfg) if rescorer == "config" else rescorer)

    # ------------------------------------------------------------------ short clips: ctranslate2 batches

    def _prompt(self, language: Optional[str]) -> List[int]:
        from loratune.asr.transcriber import decoder_prompt

        return decoder_prompt(self.tokenizer, language, self.task)

    def _short(self, audios: Sequence[np.ndarray], max_new_tokens: Optional[int]) -> List[Transcript]:
        import ctranslate2

        if self.trim_audio:
            from loratune.asr.trim import batch_num_frames

            x = trimmed_features(self.processor.feature_extractor, audios, batch_num_frames(len(a) for a in audios))
        else:
            x = full_features(self.processor.feature_extractor, audios)
        budget = max_new_tokens
        if self.max_tokens_per_second:  # no transcript longer than speech allows (as the transformers path)
            limit = math.ceil(max(len(a) for a in audios) / SAMPLE_RATE * self.max_tokens_per_second) + 4
            budget = min(budget or limit, limit)
        features = ctranslate2.StorageView.from_array(x)
        if self.language:
            languages = [self.language] * len(audios)
        else:  # encode once, detect, and decode from the same encoder output
            features = self.model.encode(features, to_cpu=False)
            languages = [r[0][0].strip("<|>") for r in self.model.detect_language(features)]
        prompts = [self._prompt(lang) for lang in languages]
        # ctranslate2's Whisper halves max_length before decoding (whisper.cc: max_length / 2 new
        # tokens, as openai-whisper's sample_len = n_text_ctx // 2), so N new tokens need 2 * N
        max_length = 2 * min(budget, 448 - len(prompts[0])) if budget else 448
        if self.rescorer is not None:  # n-best list re-ranked by a causal LM (asr/rescore.py)
            k = self.rescorer.hypotheses
            results = self.model.generate(features, prompts, beam_size=k, num_hypotheses=k, return_scores=True,
                                          max_length=max_length, no_repeat_ngram_size=self.no_repeat_ngram_size)
            # scores are length-normalised log-probabilities (length_penalty=1): times the length, the sum
            nbests = [[(t.strip(), score * len(ids)) for t, score, ids in
                       zip(self.tokenizer.batch_decode(r.sequences_ids, skip_special_tokens=True), r.scores, r.sequences_ids)]
                      for r in results]
            texts = self.rescorer.choose(nbests)
        else:
            results = self.model.generate(features, prompts, beam_size=self.num_beams, max_length=max_length,
                                          no_repeat_ngram_size=self.no_repeat_ngram_size)
            texts = [t.strip() for t in self.tokenizer.batch_decode([r.sequences_ids[0] for r in results], skip_special_tokens=True)]
        out = []
        for audio, text, lang in zip(audios, texts, languages):
            duration = len(audio) / SAMPLE_RATE
            out.append(Transcript(text, lang, duration, [Segment(0.0, duration, text)] if text else []))
        return out

    # ------------------------------------------------------------------ long files / timestamps: faster-whisper

    def _with_timestamps(self, audio: np.ndarray, max_new_tokens: Optional[int]) -> Transcript:
        opts = dict(language=self.language, task=self.task, beam_size=self.num_beams, word_timestamps=self.word_timestamps,
                    vad_filter=self.vad, no_repeat_ngram_size=self.no_repeat_ngram_size, max_new_tokens=max_new_tokens,
                    without_timestamps=False, condition_on_previous_text=False, temperature=0.0)
        if self.long_form == "batched" and len(audio) > WINDOW_SECONDS * SAMPLE_RATE:
            from faster_whisper import BatchedInferencePipeline

            self._batched = self._batched or BatchedInferencePipeline(self.fw)
            opts.pop("condition_on_previous_text")
            segments, info = self._batched.transcribe(audio, batch_size=self.batch_size, **{**opts, "vad_filter": True})
        else:
            segments, info = self.fw.transcribe(audio, **opts)
        duration = len(audio) / SAMPLE_RATE
        segs = []
        for s in segments:
            text = s.text.strip()
            if text:  # clamp: as the transformers path, nothing past the end of the audio
                start = min(max(float(s.start), 0.0), duration)
                words = [{"start": round(w.start, 2), "end": round(w.end, 2), "word": w.word, "probability": round(w.probability, 3)}
                         for w in (s.words or [])] if self.word_timestamps else None
                segs.append(Segment(start, max(start, min(float(s.end), duration)), text, words))
        return Transcript(join_texts([s.text for s in segs], info.language), info.language, duration, segs)

    def __call__(self, audios: Sequence[np.ndarray], max_new_tokens: Optional[int] = None) -> List[Transcript]:
        """Transcribe a batch: short clips by length in ctranslate2 batches, the rest one by one."""
        out: List[Optional[Transcript]] = [None] * len(audios)
        timed = self.timestamps or self.word_timestamps
        vad = self.long_form == "vad" and not self.word_timestamps
        limit = longest_clip_seconds(self.long_form if vad else "sequential", self.chunk_seconds) * SAMPLE_RATE
        short = sorted((i for i, a in enumerate(audios) if len(a) <= limit and not timed), key=lambda i: len(audios[i]))
        for start in range(0, len(short), self.batch_size):
            idx = short[start : start + self.batch_size]
            for i, t in zip(idx, self._short([audios[i] for i in idx], max_new_tokens)):
                out[i] = t
        for i in (i for i in range(len(audios)) if out[i] is None):
            if vad and len(audios[i]) > limit:
                out[i] = transcribe_at_pauses(audios[i], lambda clips: self._short(clips, max_new_tokens), self.chunk_seconds,
                                              self.merge_seconds, self.batch_size, self.language)
            else:
                out[i] = self._with_timestamps(audios[i], max_new_tokens)
        return out  # type: ignore[return-value]


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``transformers`` on a CUDA GPU, else ``ctranslate2`` (when faster-whisper is installed).

    Why per device (benchmarks/RESULTS.md): on the 2-core CPU the ctranslate2 int8 path decodes HSK clips
    4.3x faster than transformers; on an H200 (run 31, large-v3-turbo, 30-s clips) ctranslate2 4.8.5
    reached 20.9 (float16) / 35.8 (bfloat16) clips/s against 82.6 for transformers' plain fp16 generate
    and 173.1 for its fast path (static cache, compiled encoder).
    """
    if backend != "auto":
        return backend
    import importlib.util

    import torch

    if torch.cuda.is_available():
        return "transformers"
    if importlib.util.find_spec("faster_whisper") is None:
        log.info("transcribe.backend=auto: faster-whisper is not installed, using transformers")
        return "transformers"
    return "ctranslate2"


def make_transcriber(cfg, backend: Optional[str] = None):
    """The transcriber ``transcribe.backend`` (or ``backend``) names, loaded from ``cfg``."""
    import importlib.util

    from loratune.errors import ConfigError

    backend = resolve_backend(backend or cfg.transcribe.backend)
    if backend == "ctranslate2":
        if importlib.util.find_spec("faster_whisper") is None:
            raise ConfigError("transcribe.backend=ctranslate2 needs faster-whisper (pip install 'loratune[export]'); "
                              "install it or set transcribe.backend=transformers")
        return CT2Transcriber.from_config(cfg)
    from loratune.asr.transcriber import Transcriber

    return Transcriber.from_config(cfg)
