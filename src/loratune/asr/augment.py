"""Audio augmentation for Whisper training, applied afresh to each example every time it is batched.

    from loratune.asr.augment import AudioAugment
    aug = AudioAugment(speeds=(0.9, 1.0, 1.1), gain_db=6.0, noise_snr_db=15.0, noise_prob=0.5)
    audio = aug(audio, rng)          # float32 mono 16 kHz in, float32 out (length changes with speed/tempo)

Why here and not in the feature cache: a cached log-mel is one fixed copy of a clip, so every epoch
would see the same "augmented" version. With ``data.features=audio`` the cache holds the decoded
audio and the collator computes log-mels per batch, after this step (``asr.collator``).

* **speed perturbation** (Ko et al. 2015, the standard ASR recipe: factors 0.9 / 1.0 / 1.1): the clip
  is resampled, so tempo and pitch change together, as sox ``speed`` does. Resampling is done in the
  frequency domain (band-limited, no aliasing) with numpy's real FFT; a factor that would push the
  clip past ``max_seconds`` is not used for that clip;
* **tempo perturbation**: the clip is played slower or faster with its pitch kept (FFmpeg's
  ``atempo`` through PyAV, WSOLA), the change a slow or fast speaker makes; speed perturbation
  changes the voice's pitch too, and on dev slowed to 0.8x it did not help (ACCURACY.md row S3);
* **gain**: a random volume change, uniform in +-``gain_db``;
* **noise**: white noise at a random signal-to-noise ratio between ``noise_snr_db`` and
  ``noise_snr_db + 20`` dB, on a ``noise_prob`` share of the examples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

SAMPLE_RATE = 16_000


def change_speed(audio: np.ndarray, factor: float) -> np.ndarray:
    """Play ``audio`` ``factor`` times faster (factor > 1: shorter and higher), band-limited."""
    n = len(audio)
    m = max(1, int(round(n / factor)))
    if m == n:
        return audio
    spectrum = np.fft.rfft(audio.astype(np.float64))
    keep = m // 2 + 1
    if keep <= len(spectrum):
        spectrum = spectrum[:keep]  # speeding up: drop what would alias
    out = np.fft.irfft(spectrum, n=m) * (m / n)
    return out.astype(np.float32)


def change_tempo(audio: np.ndarray, factor: float) -> np.ndarray:
    """Play 16-kHz ``audio`` ``factor`` times faster with its pitch kept (FFmpeg ``atempo``, 0.5-2.0)."""
    from fractions import Fraction

    import av

    if factor == 1.0 or len(audio) == 0:
        return audio
    graph = av.filter.Graph()
    src = graph.add_abuffer(format="flt", sample_rate=SAMPLE_RATE, layout="mono", time_base=Fraction(1, SAMPLE_RATE))
    stretch, sink = graph.add("atempo", str(factor)), graph.add("abuffersink")
    src.link_to(stretch)
    stretch.link_to(sink)
    graph.configure()
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(audio, np.float32)[None, :], format="flt", layout="mono")
    frame.sample_rate, frame.pts = SAMPLE_RATE, 0
    graph.push(frame)
    graph.push(None)
    chunks = []
    while True:
        try:
            chunks.append(graph.pull().to_ndarray().reshape(-1))
        except (av.error.BlockingIOError, av.error.EOFError):
            break
    return np.concatenate(chunks).astype(np.float32, copy=False) if chunks else audio


@dataclass
class AudioAugment:
    """Random speed, gain and noise for one clip at a time; see the module docstring."""

    speeds: Sequence[float] = ()
    gain_db: float = 0.0
    noise_snr_db: Optional[float] = None
    noise_prob: float = 0.5
    max_seconds: float = 30.0
    tempos: Sequence[float] = ()

    @classmethod
    def from_config(cls, aug, max_seconds: float = 30.0) -> Optional["AudioAugment"]:
        """The ``augment`` section as an AudioAugment, or None when it changes nothing."""
        out = cls(tuple(aug.speeds), aug.gain_db, aug.noise_snr_db, aug.noise_prob, max_seconds, tuple(aug.tempos))
        return out if out.active else None

    @property
    def active(self) -> bool:
        return (any(s != 1.0 for s in self.speeds) or any(t != 1.0 for t in self.tempos) or self.gain_db > 0
                or self.noise_snr_db is not None)

    def __call__(self, audio: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.speeds:
            factor = float(self.speeds[rng.integers(len(self.speeds))])
            if factor != 1.0 and len(audio) / factor <= self.max_seconds * SAMPLE_RATE:
                audio = change_speed(audio, factor)
        if self.tempos:
            factor = float(self.tempos[rng.integers(len(self.tempos))])
            if factor != 1.0 and len(audio) / factor <= self.max_seconds * SAMPLE_RATE:
                audio = change_tempo(audio, factor)
        if self.gain_db > 0:
            audio = audio * np.float32(10 ** (rng.uniform(-self.gain_db, self.gain_db) / 20))
        if self.noise_snr_db is not None and rng.random() < self.noise_prob:
            power = float(np.mean(np.square(audio, dtype=np.float64)))
            snr = rng.uniform(self.noise_snr_db, self.noise_snr_db + 20.0)
            noise = rng.standard_normal(len(audio)) * np.sqrt(power / 10 ** (snr / 10))
            audio = audio + noise.astype(np.float32)
        return np.clip(audio, -1.0, 1.0).astype(np.float32, copy=False)
