"""CTranslate2 Whisper checkpoint (faster-whisper layout) -> Hugging Face Whisper directory.

    from loratune.asr.ct2_convert import convert_ct2_whisper
    convert_ct2_whisper("faster-whisper-base/", "whisper-base-hf/")   # CLI: loratune convert DIR convert.output_dir=OUT

Input: ``model.bin`` (read by :mod:`loratune.asr.ct2`, any size, float32/float16/bfloat16 or
int8/int16 quantised — dequantised with the stored scales), ``config.json`` (suppress lists,
language ids, alignment heads), ``tokenizer.json`` and ``vocabulary.*``. Output: safetensors
weights, ``config.json``, ``generation_config.json``, a ``WhisperTokenizerFast`` whose vocabulary
covers the model's timestamp tokens, and a ``WhisperFeatureExtractor`` with the model's mel bins.
The directory is written to a temp folder beside the target and renamed into place at the end.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from loratune.asr.ct2 import CT2Checkpoint, read_model_bin, scalar
from loratune.core.atomic import atomic_dir
from loratune.errors import ModelError

log = logging.getLogger(__name__)

_LAYER = re.compile(r"^(encoder|decoder)/layer_(\d+)/")
_SPECIAL = ["<|endoftext|>", "<|startoftranscript|>", "<|transcribe|>", "<|translate|>", "<|notimestamps|>", "<|startofprev|>"]


def _num_layers(ckpt: CT2Checkpoint, side: str) -> int:
    found = {int(m.group(2)) for n in ckpt.names() if (m := _LAYER.match(n)) and m.group(1) == side}
    return max(found) + 1 if found else 0


def _linear(sd: Dict, ckpt: CT2Checkpoint, src: str, dst: str) -> None:
    sd[f"{dst}.weight"] = ckpt.get(f"{src}/weight")
    if f"{src}/bias" in ckpt:
        sd[f"{dst}.bias"] = ckpt.get(f"{src}/bias")


def _norm(sd: Dict, ckpt: CT2Checkpoint, src: str, dst: str) -> None:
    sd[f"{dst}.weight"] = ckpt.get(f"{src}/gamma")
    sd[f"{dst}.bias"] = ckpt.get(f"{src}/beta")


def _split_projections(sd: Dict, ckpt: CT2Checkpoint, src: str, dst: str, names: List[str]) -> None:
    """Undo the converter's fusion of q/k/v (or k/v); Whisper's k_proj has no bias.

    Dropping the fused k bias is exact: q.(k + b) adds the same value to every key's score,
    which softmax ignores (the converter stores zeros there anyway).
    """
    weight = ckpt.get(f"{src}/weight")
    bias = ckpt.get(f"{src}/bias") if f"{src}/bias" in ckpt else None
    for i, (w, name) in enumerate(zip(np.split(weight, len(names)), names)):
        sd[f"{dst}.{name}.weight"] = w
        if bias is not None:
            b = np.split(bias, len(names))[i]
            if name == "k_proj":
                if np.abs(b).max() > 0:
                    log.info("%s: non-zero fused key bias dropped (softmax-invariant)", src)
                continue
            sd[f"{dst}.{name}.bias"] = b


def whisper_state_dict(ckpt: CT2Checkpoint) -> Dict[str, np.ndarray]:
    """Hugging Face ``WhisperForConditionalGeneration`` state dict (float32 arrays) of a CT2 Whisper."""
    sd: Dict[str, np.ndarray] = {}
    for conv in ("conv1", "conv2"):
        _linear(sd, ckpt, f"encoder/{conv}", f"model.encoder.{conv}")
    sd["model.encoder.embed_positions.weight"] = ckpt.get("encoder/position_encodings/encodings")
    _norm(sd, ckpt, "encoder/layer_norm", "model.encoder.layer_norm")
    for i in range(_num_layers(ckpt, "encoder")):
        s, d = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        _split_projections(sd, ckpt, f"{s}/self_attention/linear_0", f"{d}.self_attn", ["q_proj", "k_proj", "v_proj"])
        _linear(sd, ckpt, f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj")
        _norm(sd, ckpt, f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm")
        _linear(sd, ckpt, f"{s}/ffn/linear_0", f"{d}.fc1")
        _linear(sd, ckpt, f"{s}/ffn/linear_1", f"{d}.fc2")
        _norm(sd, ckpt, f"{s}/ffn/layer_norm", f"{d}.final_layer_norm")
    sd["model.decoder.embed_tokens.weight"] = ckpt.get("decoder/embeddings/weight")
    sd["model.decoder.embed_positions.weight"] = ckpt.get("decoder/position_encodings/encodings")
    _norm(sd, ckpt, "decoder/layer_norm", "model.decoder.layer_norm")
    for i in range(_num_layers(ckpt, "decoder")):
        s, d = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        _split_projections(sd, ckpt, f"{s}/self_attention/linear_0", f"{d}.self_attn", ["q_proj", "k_proj", "v_proj"])
        _linear(sd, ckpt, f"{s}/self_attention/linear_1", f"{d}.self_attn.out_proj")
        _norm(sd, ckpt, f"{s}/self_attention/layer_norm", f"{d}.self_attn_layer_norm")
        _linear(sd, ckpt, f"{s}/attention/linear_0", f"{d}.encoder_attn.q_proj")
        _split_projections(sd, ckpt, f"{s}/attention/linear_1", f"{d}.encoder_attn", ["k_proj", "v_proj"])
        _linear(sd, ckpt, f"{s}/attention/linear_2", f"{d}.encoder_attn.out_proj")
        _norm(sd, ckpt, f"{s}/attention/layer_norm", f"{d}.encoder_attn_layer_norm")
        _linear(sd, ckpt, f"{s}/ffn/linear_0", f"{d}.fc1")
        _linear(sd, ckpt, f"{s}/ffn/linear_1", f"{d}.fc2")
        _norm(sd, ckpt, f"{s}/ffn/layer_norm", f"{d}.final_layer_norm")
    sd["proj_out.weight"] = ckpt.get("decoder/projection/weight") if "decoder/projection/weight" in ckpt else sd["model.decoder.embed_tokens.weight"]
    return sd


def check_whisper(ckpt: CT2Checkpoint) -> None:
    """ModelError unless the checkpoint is a CTranslate2 Whisper with the variables we map."""
    if ckpt.spec != "WhisperSpec":
        raise ModelError(
            f"{ckpt.path}: holds a CTranslate2 {ckpt.spec or 'pre-v2 Transformer'} model, not Whisper; "
            "loratune convert only handles Whisper checkpoints (e.g. faster-whisper-*)"
        )
    needed = ["encoder/conv1/weight", "encoder/conv2/weight", "decoder/embeddings/weight",
              "encoder/layer_0/self_attention/linear_0/weight", "decoder/layer_0/attention/linear_1/weight"]
    missing = [n for n in needed if n not in ckpt]
    if missing:
        raise ModelError(f"{ckpt.path}: WhisperSpec without {missing[0]}; the file is from an unsupported CTranslate2 layout")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable JSON ({exc.__class__.__name__}); restore the checkpoint's config file") from exc


def _vocabulary(src: Path) -> Optional[List[str]]:
    """The CT2 vocabulary (includes timestamp tokens), from vocabulary.json or vocabulary.txt."""
    if (src / "vocabulary.json").is_file():
        return list(json.loads((src / "vocabulary.json").read_text(encoding="utf-8")))
    if (src / "vocabulary.txt").is_file():
        return (src / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[:-1] or None
    return None


def build_tokenizer(src: Path, vocab_size: int):
    """WhisperTokenizerFast from ``tokenizer.json``, extended with the timestamp tokens the model has.

    faster-whisper's tokenizer.json stops at ``<|notimestamps|>`` (50364 entries for multilingual
    models) while the model predicts ``<|0.00|>`` ... ``<|30.00|>`` above it; without them HF decoding
    of timestamps breaks. The special tokens are registered in id order so the tokenizer's
    ``all_special_ids[-1]`` is ``<|notimestamps|>``, which its timestamp decoding relies on.
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizerFast

    path = src / "tokenizer.json"
    if not path.is_file():
        raise ModelError(f"{src}: no tokenizer.json; copy the checkpoint's tokenizer.json (faster-whisper models ship one) next to model.bin")
    added = sorted(_read_json(path).get("added_tokens", []), key=lambda a: a["id"])
    eot = "<|endoftext|>"
    extra = [a["content"] for a in added if a.get("special") and a["content"] != eot]
    tok = WhisperTokenizerFast(tokenizer_file=str(path), bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot,
                               extra_special_tokens=extra)
    missing = vocab_size - len(tok)
    if missing < 0:
        raise ModelError(f"{path}: {len(tok)} tokens but the model's vocabulary has {vocab_size}; tokenizer and model.bin do not belong together")
    if missing:
        vocab = _vocabulary(src)
        names = vocab[len(tok):vocab_size] if vocab and len(vocab) >= vocab_size else ["<|%.2f|>" % (i * 0.02) for i in range(missing)]
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in names])
    return tok


def _lang_code(token: str) -> str:
    return token[2:-2]


def whisper_configs(ckpt: CT2Checkpoint, ct2_config: dict, tok):
    """(WhisperConfig, GenerationConfig) from the weights' shapes and the CT2 config.json."""
    from transformers import GenerationConfig, WhisperConfig

    vocab_size, d_model = ckpt.raw("decoder/embeddings/weight").shape
    ids = {t: tok.convert_tokens_to_ids(t) for t in _SPECIAL}
    unk = tok.convert_tokens_to_ids(tok.unk_token)
    enc_heads = scalar(ckpt, "encoder/num_heads") or d_model // 64
    dec_heads = scalar(ckpt, "decoder/num_heads") or enc_heads
    suppress = list(ct2_config.get("suppress_ids") or [])
    begin_suppress = list(ct2_config.get("suppress_ids_begin") or [220, ids["<|endoftext|>"]])
    lang_ids = list(ct2_config.get("lang_ids") or [])
    lang_to_id = {tok.convert_ids_to_tokens(i): i for i in lang_ids}
    multilingual = bool(lang_to_id)
    tie = "decoder/projection/weight" not in ckpt or ckpt.aliases.get("decoder/projection/weight") == "decoder/embeddings/weight" or np.array_equal(
        ckpt.raw("decoder/projection/weight"), ckpt.raw("decoder/embeddings/weight"))
    common = dict(
        decoder_start_token_id=ids["<|startoftranscript|>"], bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        begin_suppress_tokens=begin_suppress, suppress_tokens=suppress,
    )
    config = WhisperConfig(
        vocab_size=int(vocab_size), num_mel_bins=int(ckpt.raw("encoder/conv1/weight").shape[1]), d_model=int(d_model),
        encoder_layers=_num_layers(ckpt, "encoder"), decoder_layers=_num_layers(ckpt, "decoder"),
        encoder_attention_heads=int(enc_heads), decoder_attention_heads=int(dec_heads),
        encoder_ffn_dim=int(ckpt.raw("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_ffn_dim=int(ckpt.raw("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(ckpt.raw("encoder/position_encodings/encodings").shape[0]),
        max_target_positions=int(ckpt.raw("decoder/position_encodings/encodings").shape[0]),
        scale_embedding=bool(scalar(ckpt, "decoder/scale_embeddings", 0)),
        tie_word_embeddings=bool(tie), **common,
    )
    config.architectures = ["WhisperForConditionalGeneration"]
    heads = ct2_config.get("alignment_heads") or [[l, h] for l in range(config.decoder_layers // 2, config.decoder_layers) for h in range(dec_heads)]
    gen = GenerationConfig(
        **common,
        max_length=config.max_target_positions,
        no_timestamps_token_id=ids["<|notimestamps|>"],
        prev_sot_token_id=ids["<|startofprev|>"] if ids["<|startofprev|>"] != unk else None,
        max_initial_timestamp_index=50,
        is_multilingual=multilingual,
        alignment_heads=[[int(l), int(h)] for l, h in heads],
        return_timestamps=False,
    )
    if multilingual:
        gen.lang_to_id = lang_to_id
        gen.task_to_id = {"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]}
        gen.is_multilingual = True
        # The Hub's configs reach the same default through forced_decoder_ids [[1, None], [2, transcribe]];
        # without either, generate() with no language/task prompts <|sot|><|lang|><|notimestamps|> (no task
        # token) and Whisper degenerates. language stays unset, so it is still detected per clip.
        gen.task = "transcribe"
    return config, gen


def write_hf_whisper(src: Path, out: Path, dtype: str = "float32") -> Path:
    """Convert the CT2 checkpoint directory ``src`` into ``out`` (written in place; see convert_ct2_whisper)."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    ckpt = read_model_bin(src / "model.bin")
    check_whisper(ckpt)
    ct2_config = _read_json(src / "config.json") if (src / "config.json").is_file() else {}
    vocab_size = ckpt.raw("decoder/embeddings/weight").shape[0]
    tok = build_tokenizer(src, vocab_size)
    config, gen = whisper_configs(ckpt, ct2_config, tok)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    state = {k: torch.from_numpy(np.ascontiguousarray(v)).to(torch_dtype) for k, v in whisper_state_dict(ckpt).items()}
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    if config.tie_word_embeddings:
        state.pop("proj_out.weight", None)
    result = model.load_state_dict(state, strict=False, assign=True)
    unexpected = list(result.unexpected_keys)
    missing = [k for k in result.missing_keys if not (config.tie_word_embeddings and k == "proj_out.weight")]
    if missing or unexpected:
        raise ModelError(f"{src}: weights do not fit Whisper (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = gen
    model.save_pretrained(out)
    features = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
    WhisperProcessor(features, tok).save_pretrained(out)
    features.save_pretrained(out)  # preprocessor_config.json too: faster-whisper and older readers look for it
    (out / "loratune_source.json").write_text(json.dumps({
        "converted_from": str(src), "ct2_spec": ckpt.spec, "ct2_binary_version": ckpt.binary_version,
        "ct2_weight_dtype": ckpt.weight_dtype(), "dtype": dtype,
    }, indent=2), encoding="utf-8")
    return out


def convert_ct2_whisper(src: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Convert a CTranslate2 Whisper directory (or its model.bin) into a Hugging Face directory ``out``."""
    src = Path(src)
    if src.is_file():
        src = src.parent
    if not (src / "model.bin").is_file():
        raise ModelError(f"{src}: no model.bin; pass a CTranslate2 Whisper directory (model.bin, config.json, tokenizer.json)")
    read_model_bin(src / "model.bin")  # fail on a bad file before creating anything
    return atomic_dir(Path(out), lambda tmp: write_hf_whisper(src, tmp, dtype), overwrite=overwrite, overwrite_key="convert.overwrite")
