"""Long files cut at pauses and decoded as short clips: the long-form path for short-clip adapters.

    loratune transcribe talk.mp3 configs/whisper-base-hsk-qlora.yaml model.adapter=outputs/whisper-base-hsk-qlora
    # transcribe.long_form=auto picks this path for an adapter trained in short-clip mode
    # (whisper.trim_audio=true) and Whisper's own 30-s window loop for everything else

Why: an adapter trained on 1-5-s clips without timestamp tokens does not carry over to Whisper's
sequential 30-s windows (benchmarks/ACCURACY.md: on 2-minute files joined from dev clips the
default HSK adapter's CER was 0.201 through that loop against 0.0616 clip by clip). Here Silero VAD
(the model faster-whisper ships, run by its ``get_speech_timestamps``) cuts the speech at its pauses
into chunks of at most ``transcribe.chunk_seconds`` (merged up to ``transcribe.merge_seconds`` when
that is set), and the chunks are decoded
by the transcriber's own short-clip batch path (trimmed input when the adapter was trained so), so the
model sees what it was trained on. A segment is a chunk: its times are the chunk's, from the VAD.

Both backends (``asr/transcriber.py``, ``asr/ct2_transcriber.py``) call ``transcribe_at_pauses``.
Tests: ``python -m pytest -q tests/test_longform.py``.
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from loratune.core.audio import SAMPLE_RATE

log = logging.getLogger(__name__)

NO_SPACE_LANGUAGES = ("zh", "ja", "yue", "th", "lo", "km", "my", "bo")  # scripts written without spaces between phrases


def join_texts(texts: Sequence[str], language: Optional[str]) -> str:
    """Segment texts as one transcript: no separator for Chinese/Japanese/Thai..., a space otherwise."""
    sep = "" if (language or "") in NO_SPACE_LANGUAGES else " "
    return sep.join(t for t in texts if t)


def resolve_long_form(mode: str, trim_audio: bool) -> str:
    """``auto`` -> ``vad`` for a short-clip adapter (``whisper.trim_audio``), else ``sequential``.

    ``vad`` needs faster-whisper (its Silero VAD); without it ``auto`` keeps ``sequential``."""
    if mode != "auto":
        if mode == "vad" and importlib.util.find_spec("faster_whisper") is None:
            from loratune.errors import ConfigError

            raise ConfigError("transcribe.long_form=vad needs faster-whisper for its Silero VAD (pip install 'loratune[export]'); "
                              "install it or set transcribe.long_form=sequential")
        return mode
    if not trim_audio:
        return "sequential"
    if importlib.util.find_spec("faster_whisper") is None:
        log.info("transcribe.long_form=auto: faster-whisper (Silero VAD) is not installed, long files use the 30-s window loop")
        return "sequential"
    return "vad"


def longest_clip_seconds(long_form: str, chunk_seconds: float) -> float:
    """Files longer than this go through the long-form path: 30 s (one Whisper window), or with
    ``vad`` the chunk limit, because a short-clip adapter given a 28-s file of many sentences as one
    clip kept only the first ones (CER 0.86 on a 28.5-s file of dev clips, RESULTS.md issue 15)."""
    return chunk_seconds if long_form == "vad" else 30.0


def speech_chunks(audio: np.ndarray, max_seconds: float, merge_seconds: float = 0.0, min_silence_ms: int = 300,
                  pad_ms: int = 200) -> List[Tuple[int, int]]:
    """``[(start, end)]`` sample spans of speech, at most ``max_seconds`` each; neighbours are merged
    while the merged chunk lasts at most ``merge_seconds`` (0 = every pause ends a chunk).

    A pause of ``min_silence_ms`` ends a span (faster-whisper's default of 2 s would make one span of
    a whole talk); ``pad_ms`` of context is kept on each side, as Silero's own default padding does.
    One span longer than ``max_seconds`` is cut by the VAD at its longest pause (or hard at the limit).
    Why no merging by default: the HSK adapter, trained on one sentence a clip, drops the second
    sentence of a merged chunk (2-minute dev files: CER 0.046 unmerged, 0.123 merged up to 5 s)."""
    from faster_whisper.vad import VadOptions, get_speech_timestamps

    opts = VadOptions(min_silence_duration_ms=min_silence_ms, speech_pad_ms=pad_ms, max_speech_duration_s=max_seconds,
                      min_speech_duration_ms=250)
    spans = [(int(s["start"]), int(s["end"])) for s in get_speech_timestamps(np.asarray(audio, np.float32), opts)]
    limit = int(min(merge_seconds, max_seconds) * SAMPLE_RATE)
    chunks: List[Tuple[int, int]] = []
    for start, end in spans:
        if chunks and end - chunks[-1][0] <= limit:
            chunks[-1] = (chunks[-1][0], end)
        else:
            chunks.append((start, end))
    return chunks


def transcribe_at_pauses(audio: np.ndarray, decode: Callable[[List[np.ndarray]], list], chunk_seconds: float,
                         merge_seconds: float, batch_size: int, language: Optional[str]):
    """``long_form=vad`` for one file: ``speech_chunks`` then ``transcribe_chunked`` (both backends)."""
    return transcribe_chunked(audio, speech_chunks(audio, chunk_seconds, merge_seconds), decode, batch_size, language)


def transcribe_chunked(audio: np.ndarray, chunks: Sequence[Tuple[int, int]], decode: Callable[[List[np.ndarray]], list],
                       batch_size: int, language: Optional[str]):
    """One ``Transcript`` of ``audio`` from its ``chunks`` decoded by ``decode`` (a short-clip batch
    function returning Transcripts), ``batch_size`` at a time, shortest first (a trimmed batch is as
    long as its longest clip). Each chunk's segments are shifted to the chunk's place in the file."""
    from loratune.asr.transcriber import Segment, Transcript

    duration = len(audio) / SAMPLE_RATE
    order = sorted(range(len(chunks)), key=lambda i: chunks[i][1] - chunks[i][0])
    outs: List = [None] * len(chunks)
    for b in range(0, len(order), max(1, batch_size)):
        idx = order[b : b + max(1, batch_size)]
        for i, t in zip(idx, decode([audio[chunks[i][0] : chunks[i][1]] for i in idx])):
            outs[i] = t
    segments = []
    for (start, end), t in zip(chunks, outs):
        offset, chunk_end = start / SAMPLE_RATE, end / SAMPLE_RATE
        for s in t.segments:
            words = [{**w, "start": round(w["start"] + offset, 2), "end": round(w["end"] + offset, 2)} for w in s.words] if s.words else s.words
            segments.append(Segment(min(s.start + offset, chunk_end), min(s.end + offset, chunk_end), s.text, words))
    detected = next((t.language for t in outs if t.language), language)
    return Transcript(join_texts([s.text for s in segments], detected or language), language or detected, duration, segments)
