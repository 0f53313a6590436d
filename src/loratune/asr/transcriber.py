"""Batched Whisper transcription of in-memory 16-kHz audio, and the transcript formats.

    from loratune.asr.transcriber import Transcriber
    t = Transcriber.from_config(load_config("configs/whisper-base-hsk-qlora.yaml", ["model.adapter=DIR"]))
    print(t([audio_16k])[0].text)

Used by the ``transcribe``, ``evaluate`` and ``serve`` verbs. Clips up to 30 s are decoded in
batches in one pass; longer files go through Whisper's own sequential long-form algorithm
(transformers' ``generate`` on un-truncated features, timestamp tokens, each window starting at the
last complete segment's end), or with ``transcribe.long_form=vad`` are cut at pauses and decoded as
short clips (``asr/longform.py``; the default for short-clip adapters). ``check_audio`` is the one rule for what audio can be transcribed.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from loratune.core.audio import SAMPLE_RATE
from loratune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = {".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".webm", ".mp4", ".wma"}
FORMATS = ("txt", "srt", "vtt", "json")
WINDOW_SECONDS = 30.0


MIN_SECONDS = 0.3  # shorter than one spoken syllable plus its onset: a 0.1-s clip gave "你不想要我"


def audio_problem(audio: np.ndarray, max_seconds: float, min_rms: float = 1e-4, limit_key: str = "transcribe.max_audio_seconds") -> Optional[tuple]:
    """``(kind, message)`` for empty / too-long / too-short / silent audio (kind: ``empty``,
    ``too_long``, ``too_short``, ``silent``), None when the audio is usable. The service maps the kind to an HTTP status."""
    seconds = len(audio) / SAMPLE_RATE
    if len(audio) == 0:
        return "empty", "audio decoded to zero samples"
    if seconds > max_seconds:
        return "too_long", f"audio is {seconds:.0f} s long, over the {max_seconds:.0f}-s limit; cut it or raise {limit_key}"
    if seconds < MIN_SECONDS:  # Whisper answers such a blip with a confident made-up sentence
        return "too_short", (f"audio is {seconds:.2f} s long, under the {MIN_SECONDS} s that can hold a word; "
                             "nothing reliable to transcribe")
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    if rms < min_rms:
        return "silent", f"audio is silent (RMS level {rms:.1e} < {min_rms:.0e}); nothing to transcribe"
    return None


def check_audio(audio: np.ndarray, name: str, max_seconds: float, min_rms: float = 1e-4, limit_key: str = "transcribe.max_audio_seconds") -> np.ndarray:
    """DataError for empty, silent or too-long audio; returns the audio unchanged."""
    problem = audio_problem(audio, max_seconds, min_rms, limit_key)
    if problem:
        raise DataError(f"{name}: {problem[1]}")
    return audio


def find_audio_files(paths: Sequence[str]) -> List[Path]:
    """Expand files and folders (recursively) into a sorted list of audio files."""
    if not paths:
        raise ConfigError("no input: pass audio files or folders, e.g. `loratune transcribe talk.mp3`")
    files: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS)
            if not found:
                raise DataError(f"{p}: folder holds no audio files ({', '.join(sorted(AUDIO_EXTENSIONS))})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or folder")
    return files


@dataclass
class Segment:
    start: float
    end: float
    text: str
    words: Optional[List[Dict]] = None  # [{start, end, word, probability}] with transcribe.word_timestamps


@dataclass
class Transcript:
    text: str
    language: Optional[str]
    duration: float
    segments: List[Segment] = field(default_factory=list)

    def to_dict(self) -> Dict:
        return {
            "text": self.text,
            "language": self.language,
            "duration": round(self.duration, 3),
            "segments": [{"start": round(s.start, 2), "end": round(s.end, 2), "text": s.text, **({"words": s.words} if s.words is not None else {})}
                         for s in self.segments],
        }


class Transcriber:
    """Batched Whisper transcription of in-memory 16-kHz audio (used by transcribe and serve)."""

    def __init__(self, model, processor, language: Optional[str] = None, task: str = "transcribe", num_beams: int = 1, timestamps: bool = False, trim_audio: bool = False,
                 no_repeat_ngram_size: int = 0, max_tokens_per_second: Optional[float] = None, long_form: str = "sequential",
                 chunk_seconds: float = 10.0, batch_size: int = 8, merge_seconds: float = 0.0, rescorer=None):
        import torch

        self.model, self.processor = model, processor
        self.tokenizer = processor.tokenizer
        self.language, self.task, self.num_beams, self.timestamps = language, task, num_beams, timestamps
        self.device = next(model.parameters()).device
        self.dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        if self.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            self.dtype = torch.float32
        self.no_repeat_ngram_size, self.max_tokens_per_second = no_repeat_ngram_size, max_tokens_per_second
        self.long_form, self.chunk_seconds, self.batch_size = long_form, chunk_seconds, max(1, batch_size)
        self.merge_seconds = merge_seconds
        self.rescorer = rescorer  # asr/rescore.LMRescorer: the n-best list re-ranked by a causal LM
        self.trim_audio = False
        if trim_audio:
            from loratune.asr.trim import enable_encoder_trimming

            enable_encoder_trimming(model)
            self.trim_audio = True

    @classmethod
    def from_config(cls, cfg) -> "Transcriber":
        from loratune.core.loading import check_language, load_asr

        language = check_language(cfg.whisper.language)  # fail before loading the model
        model, processor = load_asr(cfg)
        from loratune.asr.speed import apply_generation_speed  # whisper.static_cache / compile_encoder, off by default

        apply_generation_speed(model, cfg.whisper, cfg.model)
        from loratune.asr.longform import resolve_long_form
        from loratune.asr.rescore import LMRescorer

        w, t = cfg.whisper, cfg.transcribe
        return cls(model, processor, language, w.task, w.num_beams, w.timestamps, w.trim_audio, w.no_repeat_ngram_size, w.max_tokens_per_second,
                   resolve_long_form(t.long_form, w.trim_audio), t.chunk_seconds, t.batch_size, t.merge_seconds,
                   LMRescorer.from_config(cfg))

    def _features(self, audios: Sequence[np.ndarray], long_form: bool):
        fe = self.processor.feature_extractor
        if long_form:
            feats = fe(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="pt", truncation=False, padding="longest", return_attention_mask=True)
        else:
            feats = fe(list(audios), sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True)
        x = feats.input_features.to(self.device, self.dtype)
        mask = feats.attention_mask.to(self.device)
        if long_form and x.shape[-1] < 3000:  # padding="longest" of a batch that only just crosses 30 s
            import torch

            x = torch.nn.functional.pad(x, (0, 3000 - x.shape[-1]))
        if not long_form and self.trim_audio and not self.timestamps:
            from loratune.asr.trim import batch_num_frames

            x = x[..., : batch_num_frames(len(a) for a in audios)]
            mask = mask[..., : x.shape[-1]]
        return x, mask

    def _generation_config(self, max_new_tokens: Optional[int]):
        """One generation config per call (never a config plus loose generation arguments).

        A token budget is written as ``max_length``: Whisper's ``generate`` fills in a default
        ``max_length`` before it calls the generic one, so a ``max_new_tokens`` always meets a
        ``max_length`` there and transformers warns once per batch. Whisper counts ``max_length``
        after its own prompt (<|startoftranscript|><|lang|><|task|>...) and caps it at the
        decoder's 448 positions, so it is the same budget. Without one, the checkpoint's applies.
        """
        import copy

        gen = copy.deepcopy(self.model.generation_config)
        gen.num_beams = self.num_beams
        if self.no_repeat_ngram_size:
            gen.no_repeat_ngram_size = self.no_repeat_ngram_size
        if max_new_tokens:
            gen.max_new_tokens, gen.max_length = None, max_new_tokens
        return gen

    def _languages(self, x) -> List[Optional[str]]:
        if self.language:
            return [self.language] * x.shape[0]
        ids = self.model.detect_language(input_features=x[..., :3000])
        return [self.tokenizer.convert_ids_to_tokens(int(i)).strip("<|>") for i in ids]

    def __call__(self, audios: Sequence[np.ndarray], max_new_tokens: Optional[int] = None) -> List[Transcript]:
        """Transcribe a batch; short clips and long files are decoded in separate passes."""
        out: List[Optional[Transcript]] = [None] * len(audios)
        from loratune.asr.longform import longest_clip_seconds

        limit = longest_clip_seconds(self.long_form, self.chunk_seconds) * SAMPLE_RATE
        short = [i for i, a in enumerate(audios) if len(a) <= limit]
        long = sorted(set(range(len(audios))) - set(short))
        if self.long_form == "vad":  # cut at pauses, decoded as short clips (asr/longform.py)
            from loratune.asr.longform import transcribe_at_pauses

            for i in long:
                out[i] = transcribe_at_pauses(audios[i], lambda clips: self._decode(clips, False, max_new_tokens), self.chunk_seconds,
                                              self.merge_seconds, self.batch_size, self.language)
            long = []
        for group, long_form in ((short, False), (long, True)):
            if group:
                for i, t in zip(group, self._decode([audios[i] for i in group], long_form, max_new_tokens)):
                    out[i] = t
        return out  # type: ignore[return-value]

    def _decode(self, audios: Sequence[np.ndarray], long_form: bool, max_new_tokens: Optional[int]) -> List[Transcript]:
        import torch

        x, mask = self._features(audios, long_form)
        if self.max_tokens_per_second and not long_form:  # no transcript longer than speech allows
            import math

            budget = math.ceil(max(len(a) for a in audios) / SAMPLE_RATE * self.max_tokens_per_second) + 4
            max_new_tokens = min(max_new_tokens or budget, budget)
        timestamps = long_form or self.timestamps
        with torch.inference_mode():
            languages = self._languages(x)
            # attention_mask: where each file ends (the long-form loop needs it; in short form it only
            # tells generate that the batch is not padded text, which silences its warning)
            kwargs = dict(language=languages, task=self.task, return_timestamps=timestamps, attention_mask=mask,
                          generation_config=self._generation_config(max_new_tokens))
            if long_form:
                # no conditioning on the previous window's text (it can propagate a hallucination across windows)
                kwargs.update(condition_on_prev_tokens=False)
            if timestamps:
                kwargs["return_segments"] = True
            if self.rescorer is not None and not timestamps:
                result, texts = None, self._rescored(x, mask, languages, max_new_tokens)
            else:
                result = self.model.generate(input_features=x, **kwargs)
                sequences = result["sequences"] if isinstance(result, dict) else result
                texts = [t.strip() for t in self.tokenizer.batch_decode(sequences, skip_special_tokens=True)]
        transcripts = []
        for b, audio in enumerate(audios):
            duration = len(audio) / SAMPLE_RATE
            segments = []
            if timestamps and isinstance(result, dict):
                for seg in result["segments"][b]:
                    text = self.tokenizer.decode(seg["tokens"], skip_special_tokens=True).strip()
                    if text:  # clamp: timestamps past the end of the audio are padding artefacts
                        start = min(max(float(seg["start"]), 0.0), duration)
                        segments.append(Segment(start, max(start, min(float(seg["end"]), duration)), text))
            if not segments and texts[b]:
                segments = [Segment(0.0, duration, texts[b])]
            transcripts.append(Transcript(texts[b], languages[b], duration, segments))
        return transcripts

    def _rescored(self, x, mask, languages: List[str], max_new_tokens: Optional[int]) -> List[str]:
        """Each clip's beam-search n-best list with Whisper's summed log-probabilities, chosen by the LM.

        Through the generic ``generate``: Whisper's own repeats the input once per returned sequence
        and decodes each copy alone, which gives the same top hypothesis k times, not an n-best list.
        """
        import torch
        from transformers import GenerationMixin

        k = self.rescorer.hypotheses
        gen = self._generation_config(None)
        gen.num_beams = gen.num_return_sequences = k
        gen.output_scores = gen.return_dict_in_generate = True
        gen.forced_decoder_ids = None  # the prompt below holds start, language, task and no-timestamps
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # LoRA layers stay in
        prompt = torch.tensor([decoder_prompt(self.tokenizer, lang, self.task) for lang in languages], device=self.device)
        # the generic generate counts max_length with the prompt (Whisper's own counts after it)
        gen.max_length = min((max_new_tokens or gen.max_length) + prompt.shape[1], model.config.max_target_positions)
        out = GenerationMixin.generate(model, input_features=x, attention_mask=mask, decoder_input_ids=prompt, generation_config=gen)
        steps = model.compute_transition_scores(out.sequences, out.scores, out.beam_indices, normalize_logits=False)
        texts = [t.strip() for t in self.tokenizer.batch_decode(out.sequences, skip_special_tokens=True)]
        return self.rescorer.choose([[(texts[b * k + j], float(steps[b * k + j].sum())) for j in range(k)] for b in range(len(languages))])


def decoder_prompt(tokenizer, language: Optional[str], task: str) -> List[int]:
    """Whisper's decoder prompt without timestamps: start, language (when known), task."""
    tokens = ["<|startoftranscript|>"] + ([f"<|{language}|>"] if language else []) + [f"<|{task}|>", "<|notimestamps|>"]
    return tokenizer.convert_tokens_to_ids(tokens)


# ---------------------------------------------------------------------------------------------
# output formats


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(max(seconds, 0.0) * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def to_srt(t: Transcript) -> str:
    blocks = [f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n" for i, s in enumerate(t.segments, 1)]
    return "\n".join(blocks)


def to_vtt(t: Transcript) -> str:
    blocks = [f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n" for s in t.segments]
    return "WEBVTT\n\n" + "\n".join(blocks)


def render(t: Transcript, fmt: str) -> str:
    if fmt == "txt":
        return t.text + "\n"
    if fmt == "srt":
        return to_srt(t)
    if fmt == "vtt":
        return to_vtt(t)
    return json.dumps(t.to_dict(), ensure_ascii=False, indent=2) + "\n"
