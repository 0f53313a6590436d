"""Whisper loading for training and inference: name -> (quantised) model + processor + LoRA.

    from loratune.asr.model import load_whisper, attach_whisper_lora
    model, processor, path = load_whisper(cfg)          # cfg.model.name: Hub id, local dir or alias
    model = attach_whisper_lora(model, cfg)             # PEFT LoRA adapter (+ short-clip mode)

``path`` is what the name resolved to (an alias becomes its local directory); adapters record the
model's public id instead (``core.names.public_id``), which loratune maps back offline.
"""
from __future__ import annotations

import logging

import torch

from loratune.core.adapters import DTYPES, attach_lora, bnb_config, device_map_for_rank, keep_4bit_layout
from loratune.errors import ModelError

log = logging.getLogger(__name__)


def resolve_name(name: str) -> str:
    from loratune.core.names import resolve_model

    return str(resolve_model(name))


def load_processor(path: str):
    from transformers import WhisperProcessor

    try:
        return WhisperProcessor.from_pretrained(path)
    except Exception as exc:
        raise ModelError(
            f"model.name={path}: cannot load a Whisper processor ({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}); "
            "give a Hub id (openai/whisper-small), a local Whisper directory or a packaged alias"
        ) from exc


def model_dtype(cfg) -> torch.dtype:
    """Dtype of the non-quantised weights: half only on CUDA with mixed precision, else fp32."""
    if torch.cuda.is_available():
        if cfg.quant.bits == 4:
            return DTYPES[cfg.quant.compute_dtype]
        if cfg.train.bf16:
            return torch.bfloat16
        if cfg.train.fp16:
            return torch.float16
    return torch.float32


def configure_generation(model, whisper_cfg) -> None:
    """Language / task / timestamps on the generation config (replaces forced_decoder_ids)."""
    gen = model.generation_config
    gen.language = whisper_cfg.language
    gen.task = whisper_cfg.task
    gen.return_timestamps = whisper_cfg.timestamps
    gen.forced_decoder_ids = None
    gen.max_length = max(getattr(gen, "max_length", 0) or 0, whisper_cfg.generation_max_length)
    if hasattr(model.config, "forced_decoder_ids"):
        model.config.forced_decoder_ids = None


def load_whisper(cfg, for_training: bool = True):
    """(model, processor, resolved path) with ``cfg.quant`` applied; ModelError names the fix."""
    from transformers import AutoConfig, WhisperForConditionalGeneration

    path = resolve_name(cfg.model.name)
    try:
        mcfg = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:
        raise ModelError(
            f"model.name={cfg.model.name}: cannot load its config ({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}); "
            "give a Hub id, a local Whisper directory or a packaged alias (offline: a local directory)"
        ) from exc
    if mcfg.model_type != "whisper":
        raise ModelError(f"model.name={cfg.model.name} is a {mcfg.model_type!r} model, not Whisper; task=asr needs a Whisper checkpoint")
    processor = load_processor(path)
    kwargs = dict(dtype=model_dtype(cfg), attn_implementation=cfg.model.attn_implementation)
    quant = bnb_config(cfg.quant)
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = device_map_for_rank()
    try:
        model = WhisperForConditionalGeneration.from_pretrained(path, **kwargs)
    except Exception as exc:
        raise ModelError(f"model.name={cfg.model.name}: loading failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if quant is not None:
        keep_4bit_layout(model)  # bitsandbytes' CPU inference repacking breaks later training steps
    configure_generation(model, cfg.whisper)
    if for_training and cfg.whisper.spec_augment:
        # transformers masks the input features in forward() while the model is in training mode
        model.config.apply_spec_augment = True
        model.config.mask_time_prob = cfg.whisper.mask_time_prob
        model.config.mask_feature_prob = cfg.whisper.mask_feature_prob
    if for_training:
        model.config.use_cache = False  # the KV cache is useless (and warns) in teacher-forced training
    log.info("loaded %s (%s, quantisation %s)", path, kwargs["dtype"], f"{cfg.quant.bits}-bit" if cfg.quant.bits else "none")
    return model, processor, path


def attach_whisper_lora(model, cfg):
    """PEFT LoRA (a plain ``PeftModel``); the short-clip encoder patch when ``whisper.trim_audio``.

    No ``task_type``: PEFT's SEQ_2_SEQ_LM wrapper calls ``forward(input_ids=None, ...)``, which
    Whisper (it takes ``input_features``) passes on to its decoder as a duplicate ``input_ids``
    and fails; the Whisper LoRA tutorials use the plain wrapper for the same reason, and their
    reload path (``PeftModel.from_pretrained`` + ``AutomaticSpeechRecognitionPipeline``) wants it.
    """
    model = attach_lora(model, cfg, task_type=None)
    if cfg.whisper.trim_audio:
        from loratune.asr.trim import enable_encoder_trimming  # written alongside; imported only when used

        enable_encoder_trimming(model)
    return model  # the train.* speed switches are applied by core.training for both wings


def max_label_tokens(path: str) -> int:
    """The decoder's position limit (448 for every released Whisper)."""
    from transformers import AutoConfig

    return int(getattr(AutoConfig.from_pretrained(path), "max_target_positions", 448))
