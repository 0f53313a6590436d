"""Whisper's part of the speed switches: hooks for ``core.speed.apply_training_speed`` and the
transcription switches.

    from loratune.asr.speed import apply_training_speed, apply_generation_speed
    apply_training_speed(model, cfg)                   # core switches + the Whisper hooks below
    apply_generation_speed(model, cfg.whisper, cfg.model)   # whisper.static_cache / compile_encoder

Measured in ``benchmarks/`` (whisper_train_speed.py, whisper_generate_speed.py); checked against
the slow path by ``tests/test_speed_paths.py`` and ``tests/test_speed_compile_attention.py``.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from loratune.core import speed as core_speed
from loratune.core.adapters import peft_base

log = logging.getLogger(__name__)


def _whisper_encoder(model: nn.Module) -> Optional[nn.Module]:
    """The Whisper encoder of a (PEFT-wrapped) model, or None for other architectures."""
    return getattr(getattr(peft_base(model), "model", None), "encoder", None)


def match_encoder_input_dtype(model: nn.Module) -> bool:
    """Cast Whisper's log-mel input to the dtype of the first convolution's weights.

    With ``train.frozen_dtype=bfloat16`` the convolutions hold bf16 weights while the feature
    extractor gives fp32. Training forwards run under autocast, which casts anyway (same values);
    ``generate`` during evaluation (``train.generate_during_eval``) runs outside it and would stop
    at the first evaluation with a dtype error. Returns whether a hook was added (Whisper only)."""
    encoder = _whisper_encoder(model)
    conv = getattr(encoder, "conv1", None)
    if conv is None:
        return False

    def hook(module, args, kwargs):
        dtype = conv.weight.dtype
        if args and torch.is_tensor(args[0]) and args[0].dtype != dtype:
            return (args[0].to(dtype), *args[1:]), kwargs
        feats = kwargs.get("input_features")
        if torch.is_tensor(feats) and feats.dtype != dtype:
            kwargs["input_features"] = feats.to(dtype)
            return args, kwargs
        return None

    encoder.register_forward_pre_hook(hook, with_kwargs=True)
    return True


def precompute_causal_mask(decoder: nn.Module) -> None:
    """Hand a Whisper decoder its causal mask as a ready 4-D tensor during training forwards.

    Without one, transformers' mask builder checks the decoder's position ids for packed sequences
    with a Python ``if`` on a GPU value (``masking_utils.find_packed_sequence_indices``): the CPU
    waits there for the encoder's forward to finish once per step, and the GPU then idles while
    the backward's kernels are launched. A 4-D mask is used as given (transformers' documented
    custom-mask path); the attention it computes is the same causal attention."""

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids")
        if (not module.training or not torch.is_grad_enabled() or ids is None or args
                or kwargs.get("attention_mask") is not None or kwargs.get("past_key_values") is not None):
            return None
        n = ids.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril_()
        kwargs["attention_mask"] = causal[None, None].expand(ids.shape[0], 1, n, n)
        return args, kwargs

    decoder.register_forward_pre_hook(hook, with_kwargs=True)


def cuda_graph_layers(model: nn.Module, cfg) -> list:
    """The layers ``train.cuda_graphs`` may replay as graphs: Whisper's encoder layers when every
    clip is padded to 30 s (one shape). Trimmed clips (``whisper.trim_audio``) change the length
    every batch, and a graph per length would cost memory and recording time, so none there."""
    encoder = _whisper_encoder(model)
    if encoder is None or not hasattr(encoder, "layers"):
        log.info("train.cuda_graphs skipped: it replays Whisper encoder layers; this model has none")
        return []
    if getattr(getattr(cfg, "whisper", None), "trim_audio", False):
        log.info("train.cuda_graphs skipped: whisper.trim_audio gives every batch its own length")
        return []
    return list(encoder.layers)


class WhisperSpeedHooks(core_speed.SpeedHooks):
    def after_half_cast(self, model: nn.Module) -> bool:
        return match_encoder_input_dtype(model)

    def graph_layers(self, model: nn.Module, cfg) -> list:
        return cuda_graph_layers(model, cfg)

    def after_graphs(self, model: nn.Module) -> None:
        precompute_causal_mask(peft_base(model).model.decoder)


def apply_training_speed(model: nn.Module, cfg) -> dict:
    """``core.speed.apply_training_speed`` with the Whisper hooks."""
    return core_speed.apply_training_speed(model, cfg, WhisperSpeedHooks())


def apply_generation_speed(model: nn.Module, whisper_cfg, model_cfg=None) -> dict:
    """Apply ``whisper.static_cache`` / ``whisper.compile_encoder`` (and ``model.sdpa_backend``) to a
    Whisper model for inference."""
    base = peft_base(model)
    done = {}
    if core_speed.set_sdpa_backend(getattr(model_cfg, "sdpa_backend", None)):
        done["sdpa_backend"] = model_cfg.sdpa_backend
    if getattr(whisper_cfg, "static_cache", False):
        # transformers compiles the one-token decoder step itself once the cache is static
        base.generation_config.cache_implementation = "static"
        done["static_cache"] = True
    encoder = _whisper_encoder(model)
    if getattr(whisper_cfg, "compile_encoder", False) and encoder is not None:
        base.model.encoder = torch.compile(encoder)
        done["compiled_encoder"] = True
    return done
