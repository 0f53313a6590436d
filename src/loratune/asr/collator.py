"""Batch collation for Whisper fine-tuning (the tutorials' ``DataCollatorSpeechSeq2SeqWithPadding``).

    collate = WhisperCollator(decoder_start_token_id=model.config.decoder_start_token_id)
    batch = collate([{"input_features": np.ndarray (mels, frames), "labels": [ids]}, ...])

* labels are padded with -100 (ignored by the loss) and, when every sequence starts with the
  decoder-start token, that token is stripped: the model prepends it itself when it shifts the
  labels right, so keeping it would teach the model to predict it twice;
* log-mel features are padded along time to the batch's longest example with each example's own
  minimum value. Whisper's feature extractor pads clips to 30 s with silence, and after its
  ``max(log_spec, max - 8)`` floor silence is exactly that minimum; so with
  ``whisper.trim_audio`` (features cut to each clip's real length) a batch looks as it would
  after 30-s padding, only shorter. Without trimming every example already has 3000 frames.

``frames_major=True`` accepts features stored as (frames, mels), the layout the feature cache uses
(Arrow only allows the first dimension of a 2-D array to vary).

Examples may instead carry ``audio`` (int16 or float32 samples at 16 kHz; ``data.features=audio``):
the collator then computes their log-mels itself, per batch, with the model's feature extractor,
after the optional :class:`~loratune.asr.augment.AudioAugment` for examples marked ``augment`` (the
training rows), so every epoch sees a fresh augmented copy. The result equals the cached features of
the same clip (``tests/test_augment.py``): each clip is padded with at least 400 zero samples, as it
would be inside a 30-s window, before the STFT.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from loratune.asr.trim import trimmed_num_frames


def pad_features(feats: List[np.ndarray], multiple: int = 2) -> np.ndarray:
    """Stack (mels, frames) arrays, padding time to the longest (rounded up to ``multiple``)."""
    longest = max(f.shape[-1] for f in feats)
    longest = -(-longest // multiple) * multiple
    out = np.empty((len(feats), feats[0].shape[0], longest), dtype=np.float32)
    for i, f in enumerate(feats):
        n = f.shape[-1]
        out[i, :, :n] = f
        if n < longest:
            out[i, :, n:] = f.min()
    return out


def pad_labels(labels: List[Any], decoder_start_token_id: Optional[int], multiple: int = 1) -> torch.Tensor:
    """Right-pad token id lists with -100 (to a multiple of ``multiple``); drop a leading
    decoder-start token shared by all."""
    seqs = [np.asarray(l, dtype=np.int64).reshape(-1) for l in labels]
    if decoder_start_token_id is not None and seqs and all(len(s) and s[0] == decoder_start_token_id for s in seqs):
        seqs = [s[1:] for s in seqs]
    longest = -(-max(len(s) for s in seqs) // multiple) * multiple
    out = torch.full((len(seqs), longest), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.from_numpy(s)
    return out


@dataclass
class WhisperCollator:
    """Pads features (per-example minimum) and labels (-100) into model-ready tensors."""

    decoder_start_token_id: Optional[int] = None
    frames_major: bool = False
    pad_token_id: Optional[int] = None
    """When set, also return ``decoder_input_ids`` (labels shifted right behind the start token),
    so the loss can be computed outside the model (see ``train_asr.token_mean_loss``)."""
    pad_to_multiple_of: int = 2  # the encoder's stride-2 convolution wants an even frame count
    label_multiple: int = 1
    """Pad labels to a multiple of this many tokens: with compiled layers every new label length
    is a new shape to compile for, so 8 keeps the count of shapes (and recompilations) small."""

    feature_extractor: Any = None
    """Needed for examples that carry ``audio`` instead of ``input_features``."""
    trim: bool = True
    """Audio examples: cut each log-mel to the clip's real length (short-clip mode) instead of 30 s."""
    augment: Any = None
    """An ``AudioAugment`` applied to audio examples whose ``augment`` field is true."""

    def __call__(self, examples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        if "audio" in examples[0]:
            return self._finish(self._log_mels(examples), examples)
        feats = []
        for ex in examples:
            f = np.asarray(ex["input_features"], dtype=np.float32)
            if f.ndim == 3:  # (1, mels, frames) straight from a feature extractor
                f = f[0]
            feats.append(f.T if self.frames_major else f)
        return self._finish(feats, examples)

    def _log_mels(self, examples: List[Dict[str, Any]]) -> List[np.ndarray]:
        """(mels, frames) log-mel of each example's audio, augmented where marked."""
        if self.feature_extractor is None:
            raise ValueError("WhisperCollator: examples carry audio but no feature_extractor was given")
        rng = None
        clips = []
        for ex in examples:
            a = np.asarray(ex["audio"])
            # integer samples are 16-bit PCM, whatever width Arrow's numpy view gives them (int64)
            a = a.astype(np.float32) / 32768.0 if np.issubdtype(a.dtype, np.integer) else a.astype(np.float32, copy=False)
            if self.augment is not None and bool(ex.get("augment", False)):
                if rng is None:  # drawn from torch's generator: seeded by the Trainer, distinct per worker
                    rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
                a = self.augment(a, rng)
            clips.append(a)
        hop, full = self.feature_extractor.hop_length, self.feature_extractor.n_samples
        frames = [trimmed_num_frames(len(a)) for a in clips]  # the cache's rule (asr.features)
        # at least n_fft zero samples after every clip, as inside a 30-s window, so the last frames
        # see silence (not the reflection the STFT would otherwise add) and match the cached features
        length = min(full, max(frames) * hop + self.feature_extractor.n_fft) if self.trim else full
        mel = self.feature_extractor([a[:length] for a in clips], sampling_rate=16_000, return_tensors="np",
                                     padding="max_length", max_length=length).input_features
        return [mel[i, :, :n] for i, n in enumerate(frames)] if self.trim else list(mel)

    def _finish(self, feats: List[np.ndarray], examples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        batch = {"input_features": torch.from_numpy(pad_features(feats, self.pad_to_multiple_of))}
        if "labels" in examples[0]:
            batch["labels"] = pad_labels([ex["labels"] for ex in examples], self.decoder_start_token_id, self.label_multiple)
            if self.pad_token_id is not None and self.decoder_start_token_id is not None:
                batch["decoder_input_ids"] = shift_right(batch["labels"], self.pad_token_id, self.decoder_start_token_id)
        return batch


def shift_right(labels: torch.Tensor, pad_token_id: int, decoder_start_token_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing, exactly as Whisper derives them from ``labels``."""
    out = labels.new_full(labels.shape, pad_token_id)
    out[:, 1:] = labels[:, :-1]
    out[:, 0] = decoder_start_token_id
    return out.masked_fill_(out == -100, pad_token_id)
