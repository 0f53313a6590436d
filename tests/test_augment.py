"""On-the-fly features and audio augmentation (``data.features=audio``, ``augment.*``).

The collator's log-mels of cached audio equal the cached log-mels; speed perturbation changes tempo
and pitch by the factor; only training rows are augmented, differently each time; a tiny Whisper
trains end to end from an audio cache. Run: python -m pytest -q tests/test_augment.py
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_asr_data import hsk_clips
from tiny import tiny_asr_overrides

from loratune.asr.augment import AudioAugment, change_speed, change_tempo
from loratune.asr.collator import WhisperCollator
from loratune.config import load_config
from loratune.errors import ConfigError

SR = 16_000


def _peak_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spec)) * SR / len(x)


def test_speed_changes_length_and_pitch_by_the_factor():
    t = np.arange(SR * 2) / SR
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for factor in (0.9, 1.1):
        out = change_speed(tone, factor)
        assert len(out) == round(len(tone) / factor) and out.dtype == np.float32
        assert abs(_peak_hz(out) - 440 * factor) < 2, factor
        assert abs(np.sqrt(np.mean(out**2)) - np.sqrt(np.mean(tone**2))) < 0.01  # loudness kept
    assert change_speed(tone, 1.0) is tone


def test_audio_features_equal_the_cached_log_mels(tiny, hsk_dir):
    from transformers import WhisperFeatureExtractor

    from loratune.asr import features
    from loratune.core.audio import load_audio

    fe = WhisperFeatureExtractor.from_pretrained(tiny)
    paths = [str(hsk_dir / "audio" / name) for name, _ in hsk_clips(hsk_dir, 3)]
    clips = [load_audio(p) for p in paths]
    for trim in (True, False):
        features._init_worker(fe, 30.0, trim, audio_only=False)
        cached = [features._featurise(("r", p))[0] for p in paths]  # (frames, mels), as the cache stores them
        features._init_worker(fe, 30.0, trim, audio_only=True)
        stored = [features._featurise(("r", p))[0] for p in paths]
        assert all(s.dtype == np.int16 and len(s) == len(a) for s, a in zip(stored, clips))
        collate = WhisperCollator(frames_major=True, feature_extractor=fe, trim=trim)
        from_cache = collate([{"input_features": c} for c in cached])["input_features"]
        from_audio = collate([{"audio": s} for s in stored])["input_features"]
        assert from_cache.shape == from_audio.shape
        # int16 storage (16-bit audio, -96 dB quantisation noise) moves only bins near the log-mel
        # floor (80 dB under the clip's peak), and those by a few hundredths of a log-mel unit
        diff = (from_audio - from_cache).abs()
        assert diff.mean() < 1e-3 and diff.max() < 0.05 and (diff > 1e-2).float().mean() < 0.005
        exact = collate([{"audio": a} for a in clips])["input_features"]  # float32 audio: the same numbers
        torch.testing.assert_close(exact, from_cache, atol=1e-4, rtol=0)


def test_only_marked_rows_are_augmented_and_differently_each_time(tiny, hsk_dir):
    from transformers import WhisperFeatureExtractor

    from loratune.core.audio import load_audio

    fe = WhisperFeatureExtractor.from_pretrained(tiny)
    audio = load_audio(hsk_dir / "audio" / hsk_clips(hsk_dir, 1)[0][0])
    aug = AudioAugment(speeds=(0.9, 1.1), gain_db=6.0, noise_snr_db=10.0, noise_prob=1.0)
    collate = WhisperCollator(frames_major=True, feature_extractor=fe, trim=True, augment=aug)
    torch.manual_seed(0)
    plain = collate([{"audio": audio}])["input_features"]
    assert torch.equal(plain, collate([{"audio": audio, "augment": False}])["input_features"])
    a = collate([{"audio": audio, "augment": True}])["input_features"]
    b = collate([{"audio": audio, "augment": True}])["input_features"]
    assert not torch.equal(a, plain) and not (a.shape == b.shape and torch.equal(a, b))
    torch.manual_seed(0)
    again = collate([{"audio": audio, "augment": True}])["input_features"]
    assert torch.equal(again, a)  # reproducible from the Trainer's seed
    # speed changes the number of frames the clip occupies
    lengths = {collate([{"audio": audio, "augment": True}])["input_features"].shape[-1] for _ in range(12)}
    assert len(lengths) == 2
    assert AudioAugment.from_config(load_config(None, ["augment.speeds=[1.0]"]).augment) is None


def test_tempo_changes_length_but_keeps_pitch():
    t = np.arange(SR * 2) / SR
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for factor in (0.8, 1.1):
        out = change_tempo(tone, factor)
        assert abs(len(out) - len(tone) / factor) < 0.02 * SR and out.dtype == np.float32  # atempo keeps a few ms of tail
        assert abs(_peak_hz(out) - 440) < 2, factor  # the pitch stays (speed perturbation moves it to 440 * factor)
        assert abs(np.sqrt(np.mean(out**2)) - np.sqrt(np.mean(tone**2))) < 0.02
    assert change_tempo(tone, 1.0) is tone
    aug = AudioAugment(tempos=(0.8,))
    assert aug.active and len(aug(tone, np.random.default_rng(0))) > len(tone) * 1.2
    assert not AudioAugment(tempos=(1.0,)).active


def test_augmentation_needs_audio_features_and_sane_values():
    with pytest.raises(ConfigError, match="set data.features=audio"):
        load_config(None, ["augment.speeds=[0.9,1.0,1.1]"])
    with pytest.raises(ConfigError, match=r"augment.speeds=\[0.1\]"):
        load_config(None, ["data.features=audio", "augment.speeds=[0.1]"])
    with pytest.raises(ConfigError, match="set data.features=audio"):
        load_config(None, ["augment.tempos=[0.8,1.0]"])
    with pytest.raises(ConfigError, match=r"augment.tempos=\[3.0\]"):
        load_config(None, ["data.features=audio", "augment.tempos=[3.0]"])
    with pytest.raises(ConfigError, match="augment.gain_db"):
        load_config(None, ["data.features=audio", "augment.gain_db=-3"])
    with pytest.raises(ConfigError, match="data.features"):
        load_config(None, ["data.features=wav"])
    load_config(None, ["data.features=audio", "augment.speeds=[0.9,1.0,1.1]", "augment.noise_snr_db=15"])


def test_tiny_whisper_trains_from_an_audio_cache_with_augmentation(tiny, hsk_csv, hsk_dir, tmp_path):
    from datasets import Dataset

    from loratune.asr.train import train

    out = tmp_path / "aug"
    recipe = Path(__file__).resolve().parents[1] / "configs" / "whisper-base-hsk-qlora.yaml"
    cfg = load_config(recipe, tiny_asr_overrides(tiny, hsk_csv(8), hsk_dir, out) + [
        "data.features=audio", "augment.speeds=[0.9,1.0,1.1]", "augment.gain_db=3", "whisper.trim_audio=true",
        "train.max_steps=3", "train.eval_strategy=epoch", "train.report_to=[none]"])
    summary = train(cfg)
    assert summary["global_step"] == 3 and summary["train_loss"] > 0 and (out / "adapter_model.safetensors").is_file()
    (arrow,) = (tmp_path / "cache").glob("*/train.arrow")
    cached = Dataset.from_file(str(arrow))
    assert "audio" in cached.column_names and "input_features" not in cached.column_names
    # what the Trainer hands the collator (Arrow's numpy view: int64 samples) gives the right log-mels
    from transformers import WhisperFeatureExtractor

    rows = cached.with_format("numpy")
    assert rows[0]["audio"].dtype != np.int16  # the case that must still be read as 16-bit PCM
    fe = WhisperFeatureExtractor.from_pretrained(tiny)
    collate = WhisperCollator(frames_major=True, feature_extractor=fe, trim=True)
    pcm = [np.asarray(cached[i]["audio"], dtype=np.int16) for i in range(2)]
    direct = collate([{"audio": p.astype(np.float32) / 32768} for p in pcm])["input_features"]
    torch.testing.assert_close(collate([rows[i] for i in range(2)])["input_features"], direct, atol=1e-5, rtol=0)
