"""The base row of ``loratune evaluate``, kept between runs.

    loratune evaluate configs/whisper-base-hsk-qlora.yaml model.adapter=outputs/whisper-base-hsk-qlora
    # a second adapter, same base and test set: the base row comes from the cache in a second
    loratune evaluate configs/whisper-base-hsk-qlora.yaml model.adapter=outputs/other eval.cache_base=false  # re-score

The untuned base never changes while adapters come and go, yet scoring it is the slowest part of an
evaluation: Whisper's native 30-s input costs the default's dev split ~500 s on a 2-core CPU, four
times the adapter's trimmed clips. So the base's transcripts (and its general-set WER) are stored in
``<cache root>/eval-base/<key>.json`` and reused only when everything that decides them is the same:
the base's files, the test set (ids, references and a digest of every decoded clip), the backend and
device, every decoding and loading option (``model``, ``quant``, ``whisper``, ``rescore`` with the
LM's files, ``transcribe``, ``eval.batch_size``, ``eval.forgetting``), the shipped general set, the
package versions and loratune's own source files. Over-inclusion only costs a miss, never a wrong row. A base given as a Hub id
(no local folder to fingerprint) is never cached.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from importlib import resources
from pathlib import Path
from typing import List, Optional

log = logging.getLogger(__name__)


def _folder_fingerprint(path: str) -> Optional[dict]:
    """Files, sizes and mtimes of the resolved model folder ``path``; None for a Hub id."""
    from loratune.asr.ct2_model import _base_fingerprint

    return _base_fingerprint(path) if Path(path).is_dir() else None


def _general_set_digest() -> str:
    h = hashlib.sha256()
    root = resources.files("loratune").joinpath("resources/general")
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.is_file():
            h.update(entry.name.encode())
            h.update(entry.read_bytes())
    return h.hexdigest()


def _package_digest() -> str:
    """Digest of loratune's own source: a changed decoding rule between two releases of the same
    version number (a development checkout) must not reuse rows made by the old one."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def base_row_key(cfg, test) -> Optional[str]:
    """Hex key of everything that decides the base row; None when it cannot be pinned down."""
    import ctranslate2
    import numpy as np
    import torch
    import transformers

    import loratune
    from loratune.core.names import resolve_model
    from loratune.llm.model import resolve_causal

    base = _folder_fingerprint(resolve_model(cfg.model.name))
    # the LM resolved as the rescorer loads it (a .gguf file: its de-quantised folder)
    lm = _folder_fingerprint(resolve_causal(cfg.rescore.lm)[0]) if cfg.rescore.lm else {}
    if base is None or lm is None:
        return None
    audio = hashlib.sha256()
    for clip in test.audios:
        audio.update(np.ascontiguousarray(clip, dtype=np.float32).tobytes())
    parts = {
        "versions": [loratune.__version__, _package_digest(), torch.__version__, transformers.__version__, ctranslate2.__version__],
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "base": base, "lm": lm,
        "sections": {s: dataclasses.asdict(getattr(cfg, s)) for s in ("quant", "whisper", "rescore", "transcribe")},
        "model": {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "adapter"},
        "eval": [cfg.eval.backend, cfg.eval.batch_size, cfg.eval.forgetting],
        "general_set": _general_set_digest() if cfg.eval.forgetting else None,
        "test": [test.ids, test.texts, audio.hexdigest()],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _path(key: str) -> Path:
    from loratune.core.names import cache_root

    return cache_root() / "eval-base" / f"{key}.json"


def load_base_row(key: Optional[str], n_clips: int, needs_general: bool = False) -> Optional[dict]:
    """The stored row (``hyps``, ``general_wer``, ``seconds``, ``path``) or None; ``needs_general``:
    only a row that has its general-set WER (a base-only evaluation does not score that set)."""
    if not key or not _path(key).is_file():
        return None
    try:
        row = json.loads(_path(key).read_text("utf-8"))
    except (OSError, ValueError):  # unreadable: score again (and overwrite)
        return None
    if len(row.get("hyps", [])) != n_clips or (needs_general and row.get("general_wer") is None):
        return None
    log.info("base row from the cache: %s (eval.cache_base=false to score it again)", _path(key))
    return {**row, "path": str(_path(key))}


def save_base_row(key: Optional[str], hyps: List[str], general_wer: Optional[float], seconds: float) -> None:
    from loratune.core.atomic import write_json

    if key:
        try:
            write_json(_path(key), {"hyps": hyps, "general_wer": general_wer, "seconds": seconds})
        except OSError as exc:  # a read-only cache only costs the next run time
            log.warning("could not store the base row in %s: %s", _path(key), exc)
