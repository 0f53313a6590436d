"""``loratune export``: a (merged) Hugging Face Whisper -> CTranslate2 directory for faster-whisper.

    loratune export model.name=outputs/run-merged export.quantization=int8_float16 export.output_dir=ct2-out
    loratune export model.name=whisper-base model.adapter=outputs/run/adapter export.quantization=int8

``model.name`` is a merged model folder, a Hub id or a packaged alias; with ``model.adapter`` the
adapter is merged into a float32 copy of the base first. Conversion goes through
``ctranslate2.converters.TransformersConverter``; ``tokenizer.json`` and ``preprocessor_config.json``
(mel bins) are copied so ``faster_whisper.WhisperModel(output_dir)`` and
``ctranslate2.models.Whisper(output_dir)`` load it directly. Quantisation: ``float16``,
``int8_float16`` (int8 weights, float16 activations on GPU), ``int8``, ``int8_float32``, ``bfloat16``,
``float32``; CTranslate2 falls back to a supported type on CPUs at load time.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from loratune.errors import ModelError

log = logging.getLogger(__name__)


# the config sections this verb reads: `loratune export --help` lists only these
SECTIONS = ("model", "quant", "export")


def _merged_copy(base: str, adapter: str, dest: Path) -> Path:
    """Save base + adapter merged (float32) to dest, with the base's processor files; the adapter
    goes through the same checks as every other verb (safetensors only, shapes match the base)."""
    import torch
    from transformers import WhisperProcessor

    from loratune.core.loading import apply_adapter, check_adapter, load_base

    check_adapter(adapter)  # before the base loads
    model = apply_adapter(load_base(base, "asr", dtype=torch.float32, device=torch.device("cpu")), adapter, base)
    model.merge_and_unload().save_pretrained(dest)
    WhisperProcessor.from_pretrained(base).save_pretrained(dest)
    return dest


def _prepare_processor_files(src: Path, dest: Path) -> Path:
    """A folder with tokenizer.json + preprocessor_config.json for the converter to copy."""
    from transformers import WhisperFeatureExtractor, WhisperTokenizerFast

    WhisperTokenizerFast.from_pretrained(src).save_pretrained(dest)
    WhisperFeatureExtractor.from_pretrained(src).save_pretrained(dest)
    return dest


def export_ctranslate2(model_dir: str | Path, output_dir: str | Path, quantization: str = "int8_float16", overwrite: bool = False) -> Path:
    """Convert a Hugging Face Whisper folder to CTranslate2 in ``output_dir`` (atomic rename at the end)."""
    import shutil

    from ctranslate2.converters import TransformersConverter

    from loratune.core.atomic import atomic_dir

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{model_dir}: no config.json; pass a Hugging Face Whisper folder (e.g. the output of loratune merge)")
    import json

    model_type = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    if model_type != "whisper":
        raise ModelError(f"{model_dir}: model_type is {model_type!r}, not 'whisper'; loratune export writes Whisper models for faster-whisper only")

    def build(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=tmp.parent, prefix=".export-proc-") as proc:
            files = _prepare_processor_files(model_dir, Path(proc))
            out = tmp / "model"  # the converter wants to create its output folder itself
            TransformersConverter(str(model_dir)).convert(str(out), quantization=quantization, force=True)
            for name in ("tokenizer.json", "preprocessor_config.json"):
                shutil.copyfile(files / name, out / name)
            for item in out.iterdir():
                item.rename(tmp / item.name)
            out.rmdir()

    return atomic_dir(Path(output_dir), build, overwrite=overwrite, overwrite_key="export.overwrite")


def main(inv) -> int:
    from loratune.core.names import resolve_model

    cfg = inv.config()
    exp = cfg.export
    name = inv.paths[0] if inv.paths else cfg.model.name
    base = resolve_model(name)
    out = exp.output_dir or f"{Path(cfg.model.adapter or base).resolve()}-ct2-{exp.quantization}"
    started = time.perf_counter()
    if cfg.model.adapter:
        with tempfile.TemporaryDirectory(prefix="loratune-merge-") as tmp:
            merged = _merged_copy(base, cfg.model.adapter, Path(tmp))
            result = export_ctranslate2(merged, out, exp.quantization, exp.overwrite)
    else:
        result = export_ctranslate2(base, out, exp.quantization, exp.overwrite)
    log.info("exported %s -> %s (%s) in %.1f s", name, result, exp.quantization, time.perf_counter() - started)
    print(result)
    return 0
