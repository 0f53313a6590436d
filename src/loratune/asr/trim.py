"""Short-clip mode for Whisper: run the encoder on the batch's real length instead of 30 s.

Whisper's encoder refuses any log-mel input that is not exactly 3000 frames (30 s), so a 3-s clip
costs as much as a 30-s one. The encoder itself has no such limit: its positional embedding is a
table of 1500 rows and a shorter input simply uses the first rows. ``enable_encoder_trimming``
patches the encoder(s) of a loaded model so that an input of T < 3000 frames uses the first
ceil(T / 2) rows of that table instead of raising; 3000-frame inputs still go through the
library's own, untouched forward (bit-identical results). ``generate`` is wrapped too, because
transformers' Whisper ``generate`` zero-pads short-form inputs back to 3000 frames before the
encoder sees them; the wrapper encodes the trimmed input itself and hands ``encoder_outputs`` on.

Usage (training with a collator that pads each batch to its longest clip, see
``trimmed_num_frames``)::

    from loratune.asr.trim import enable_encoder_trimming
    enable_encoder_trimming(model)      # plain, PEFT-wrapped or bitsandbytes-quantised
    model(input_features=feats[..., :T], labels=labels)   # T = batch max, even, <= 3000
    model.generate(input_features=feats[..., :T], language="zh", task="transcribe")

Tests: ``python -m pytest -q tests/test_whisper_trim.py``.
"""
from __future__ import annotations

import math
import types
from typing import Iterable, List

import torch
from torch import nn

from loratune.core.adapters import peft_base
from loratune.errors import ModelError

SAMPLING_RATE = 16_000
HOP_LENGTH = 160  # WhisperFeatureExtractor: 10 ms per log-mel frame
FULL_FRAMES = 3000  # 30 s


def trimmed_num_frames(
    num_samples: int,
    sampling_rate: int = SAMPLING_RATE,
    hop_length: int = HOP_LENGTH,
    multiple: int = 2,
    max_frames: int = FULL_FRAMES,
) -> int:
    """Log-mel frames a clip of ``num_samples`` needs, rounded up to ``multiple`` (even by default).

    The encoder's second convolution has stride 2, so an even frame count maps onto whole
    positional-embedding rows. A larger ``multiple`` (e.g. 100 = 1 s) gives fewer distinct
    shapes, which helps ``torch.compile`` and CUDA-graph reuse. Capped at 30 s.
    """
    if sampling_rate != SAMPLING_RATE:
        num_samples = math.ceil(num_samples * SAMPLING_RATE / sampling_rate)
    multiple = max(2, int(multiple))
    multiple += multiple % 2  # keep it even
    frames = max(1, math.ceil(num_samples / hop_length))
    frames = math.ceil(frames / multiple) * multiple
    return int(min(frames, max_frames))


def batch_num_frames(sample_counts: Iterable[int], **kwargs) -> int:
    """Frames a batch needs: the longest clip's ``trimmed_num_frames``."""
    return max(trimmed_num_frames(n, **kwargs) for n in sample_counts)


def whisper_encoders(model: nn.Module) -> List[nn.Module]:
    """Every WhisperEncoder inside ``model`` (plain, PEFT ``PeftModel``, DDP, compiled ...)."""
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    base = model
    if hasattr(base, "get_base_model"):  # PEFT: PeftModel -> LoraModel -> the transformers model
        base = base.get_base_model()
    return [m for m in base.modules() if isinstance(m, WhisperEncoder)]


def _trimmed_forward(self, input_features: torch.Tensor, attention_mask=None, **kwargs):
    """WhisperEncoder.forward for inputs shorter than 30 s (the 30-s path keeps the original)."""
    full = self.max_source_positions * self.conv1.stride[0] * self.conv2.stride[0]
    frames = input_features.shape[-1]
    if frames == full:
        return self._loratune_full_forward(input_features, attention_mask=attention_mask, **kwargs)
    if frames > full:
        raise ModelError(
            f"Whisper input has {frames} log-mel frames, more than the {full} (30 s) the encoder holds; "
            "cut the audio to 30 s or use long-form transcription"
        )
    from transformers.modeling_outputs import BaseModelOutput

    inputs_embeds = nn.functional.gelu(self.conv1(input_features))
    inputs_embeds = nn.functional.gelu(self.conv2(inputs_embeds))
    inputs_embeds = inputs_embeds.permute(0, 2, 1)
    # The one change against the library: the first T' rows of the sinusoid table, not all 1500.
    positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
    hidden_states = inputs_embeds + self.embed_positions(positions)
    hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)

    want_hidden = bool(kwargs.get("output_hidden_states", False))
    all_hidden = (hidden_states,) if want_hidden else None
    for layer in self.layers:
        if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
            continue  # LayerDrop, as in the library
        out = layer(hidden_states, None)
        hidden_states = out[0] if isinstance(out, tuple) else out
        if want_hidden:
            all_hidden = all_hidden + (hidden_states,)
    hidden_states = self.layer_norm(hidden_states)
    if want_hidden:
        all_hidden = all_hidden[:-1] + (hidden_states,)
    return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden)


def _wrap_generate(gen_model: nn.Module, encoder: nn.Module) -> None:
    """Make ``generate(input_features=short)`` encode the trimmed input instead of zero-padding it."""
    if getattr(gen_model, "_loratune_trim_generate", False):
        return
    original = gen_model.generate  # bound method

    def generate(input_features=None, *args, **kwargs):
        full = encoder.max_source_positions * encoder.conv1.stride[0] * encoder.conv2.stride[0]
        if input_features is not None and input_features.shape[-1] < full and "encoder_outputs" not in kwargs:
            with torch.no_grad():
                kwargs["encoder_outputs"] = encoder(input_features)
            # attention_mask only sizes token timestamps in short-form; it must match the frames
            return original(None, *args, **kwargs)
        return original(input_features, *args, **kwargs)

    generate.__doc__ = original.__doc__
    gen_model.generate = generate
    gen_model._loratune_trim_generate = True


def enable_encoder_trimming(model: nn.Module) -> nn.Module:
    """Let ``model``'s Whisper encoder take fewer than 3000 log-mel frames; returns ``model``.

    Works on ``WhisperForConditionalGeneration``, ``WhisperModel``, PEFT wrappers around them and
    bitsandbytes-quantised bases (convolutions and position table are never quantised). Calling
    it twice is harmless. Inputs of exactly 3000 frames run the library's own code unchanged.
    """
    encoders = whisper_encoders(model)
    if not encoders:
        raise ModelError(f"{type(model).__name__} has no Whisper encoder; whisper.trim_audio needs a Whisper model")
    for enc in encoders:
        if getattr(enc, "_loratune_trim", False):
            continue
        enc._loratune_full_forward = enc.forward  # bound original (decorators included)
        enc.forward = types.MethodType(_trimmed_forward, enc)
        enc._loratune_trim = True
    gen_model = peft_base(model)  # the object whose ``generate`` does the work
    if hasattr(gen_model, "generate") and hasattr(gen_model, "get_encoder"):
        _wrap_generate(gen_model, encoders[0])
    return model


def is_trimming_enabled(model: nn.Module) -> bool:
    """True when every Whisper encoder in ``model`` has been patched."""
    encoders = whisper_encoders(model)
    return bool(encoders) and all(getattr(e, "_loratune_trim", False) for e in encoders)
