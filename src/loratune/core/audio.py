"""Audio decoding: any file FFmpeg reads (wav/flac/mp3/ogg/m4a ...) -> float32 mono at 16 kHz.

PyAV (bundled FFmpeg) decodes and resamples in one pass, so no system ffmpeg is needed.
Usage: ``load_audio("clip.mp3")`` -> ``np.ndarray`` of shape (samples,).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from loratune.errors import DataError

SAMPLE_RATE = 16_000


def load_audio(path: str | Path, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Decode ``path`` to mono float32 in [-1, 1] at ``sampling_rate``; DataError if unreadable."""
    import av

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: audio file not found; check the path / data.audio_dir")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: audio file is empty (0 bytes); remove it or re-export it")
    chunks = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DataError(f"{path}: no audio stream in the file; is it really audio?")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sampling_rate)
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
            for out in resampler.resample(None):  # flush
                chunks.append(out.to_ndarray().reshape(-1))
    except DataError:
        raise
    except Exception as exc:  # av.error.InvalidDataError and friends
        raise DataError(f"{path}: cannot decode audio ({exc.__class__.__name__}); re-encode it as wav/flac/mp3") from exc
    if not chunks:
        raise DataError(f"{path}: decoded to zero samples; the file holds no audio")
    return np.concatenate(chunks).astype(np.float32, copy=False)


def duration_seconds(audio: np.ndarray, sampling_rate: int = SAMPLE_RATE) -> float:
    return float(len(audio)) / sampling_rate
