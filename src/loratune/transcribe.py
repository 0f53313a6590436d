"""``loratune transcribe``: not implemented yet."""
from __future__ import annotations

from .errors import LoratuneError


def main(inv) -> int:
    raise LoratuneError("loratune transcribe is not implemented yet")
