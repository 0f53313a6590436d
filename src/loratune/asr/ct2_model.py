"""The CTranslate2 copy of base (+ adapter) that the ``ctranslate2`` backend runs, built once and cached.

    from loratune.asr.ct2_model import ct2_model_dir, compute_type_for
    d = ct2_model_dir("whisper-base", "outputs/whisper-base-hsk-qlora", "int8")
    # -> <cache>/ct2/whisper-base-<key>/ (model.bin, config.json, tokenizer.json, preprocessor_config.json)

The build is ``loratune export`` (``export._merged_copy`` + ``export.export_ctranslate2``: merge in
float32, convert with CTranslate2's converter), written atomically. The folder name carries a key
over everything that changes the weights: the ctranslate2 version, the quantisation, the base
(resolved path with each top-level file's name, size and modification time, or the Hub id) and the
adapter's *content* (SHA-256 of ``adapter_model.safetensors`` and ``adapter_config.json``). A
retrained adapter therefore gets a new folder on its next use; the old one stays until deleted
(``rm -r ~/.cache/loratune/ct2``). Tests: ``python -m pytest -q tests/test_ct2_backend.py``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Optional

from loratune.core.names import cache_root, resolve_model
from loratune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

NEEDED = ("model.bin", "config.json", "tokenizer.json", "preprocessor_config.json")
GPU_TYPES = ("float16", "int8_float16", "bfloat16", "int8_bfloat16", "float32", "int8", "int8_float32")
CPU_TYPES = ("int8", "int8_float32", "float32")


def compute_type_for(device: str, requested: str = "auto") -> str:
    """``auto``: int8 on CPU, int8_float16 on CUDA; anything else is checked against the device."""
    if requested == "auto":
        return "int8_float16" if device == "cuda" else "int8"
    allowed = GPU_TYPES if device == "cuda" else CPU_TYPES
    if requested not in allowed:
        raise ConfigError(f"transcribe.compute_type={requested} does not run on {device}; choose auto or one of {', '.join(allowed)}")
    return requested


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _base_fingerprint(path: str) -> dict:
    """Cheap identity of a base: its top-level files' sizes and mtimes (a Hub id stays as given)."""
    p = Path(path)
    if not p.is_dir():
        return {"id": path}
    files = sorted(f for f in p.iterdir() if f.is_file())
    return {"path": str(p.resolve()), "files": [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]}


def cache_key(base_path: str, adapter: Optional[str], quantization: str) -> str:
    """Hex key of (ctranslate2 version, quantisation, base identity, adapter content)."""
    import ctranslate2

    parts = {"ctranslate2": ctranslate2.__version__, "quantization": quantization, "base": _base_fingerprint(base_path)}
    if adapter:
        a = Path(adapter)
        parts["adapter"] = {n: _file_digest(a / n) for n in ("adapter_model.safetensors", "adapter_config.json")}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def ct2_model_dir(base_name: str, adapter: Optional[str], quantization: str, root: Optional[Path] = None) -> Path:
    """The cached CTranslate2 folder of base (+ adapter) at ``quantization``; built on first use."""
    from loratune.core.atomic import write_json
    from loratune.export import _merged_copy, export_ctranslate2

    if adapter:
        from loratune.core.loading import check_adapter

        check_adapter(adapter)  # safetensors only, not truncated: before any hashing or loading
    base = resolve_model(base_name)
    key = cache_key(base, adapter, quantization)
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in Path(base_name).name)[:40] or "model"
    target = (root or cache_root() / "ct2") / f"{slug}-{quantization}-{key}"
    if all((target / n).is_file() for n in NEEDED):
        log.info("ctranslate2 model cache hit: %s", target)
        return target
    started = time.perf_counter()
    log.info("building the ctranslate2 model (%s%s, %s) in %s", base_name, f" + {adapter}" if adapter else "", quantization, target)
    try:
        if adapter:
            with tempfile.TemporaryDirectory(prefix="loratune-merge-") as tmp:
                export_ctranslate2(_merged_copy(base, adapter, Path(tmp)), target, quantization)
        else:
            export_ctranslate2(base, target, quantization)
    except ModelError:
        if not all((target / n).is_file() for n in NEEDED):  # else another process built it meanwhile
            raise
    write_json(target / "loratune_source.json", {"base": base_name, "adapter": str(Path(adapter).resolve()) if adapter else None,
                                                 "quantization": quantization, "key": key})
    log.info("ctranslate2 model built in %.1f s", time.perf_counter() - started)
    return target
