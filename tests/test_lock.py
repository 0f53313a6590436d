"""The install is the tested one: the running environment is exactly requirements.lock.

scripts/setup.sh installs with ``pip -c requirements.lock`` (LORATUNE_DEPS=locked, the default),
so every pinned distribution must be present at its pinned version and nothing unpinned may be
installed. With ``bash scripts/test.sh --latest`` (LORATUNE_DEPS=latest) the newest releases are
installed instead: then every locked package must still be there and none may be older than the
lock (an older one means the resolver backed off a release, worth knowing before relocking).
"""
from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
UNPINNED = {"pip", "setuptools", "wheel", "loratune"}  # what pip freeze leaves out / the project itself


def _lock() -> dict:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
            assert m, f"requirements.lock: not a name==version pin: {line!r}"
            pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def _installed() -> dict:
    return {canonicalize_name(d.metadata["Name"]): Version(Version(d.version).base_version if d.metadata["Name"] == "torch" else d.version)
            for d in metadata.distributions()}


def test_setup_installs_with_the_lock():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert re.search(r"locked\) VENV=\.venv; PIN=\(-c requirements\.lock\)", setup)
    assert 'MODE=${LORATUNE_DEPS:-locked}' in setup  # locked unless asked otherwise


def test_environment_is_the_lock():
    pins, have = _lock(), _installed()
    assert "torch" in pins and "transformers" in pins and "bitsandbytes" in pins
    missing = sorted(n for n in pins if n not in have)
    assert not missing, f"locked but not installed: {missing}"
    if os.environ.get("LORATUNE_DEPS", "locked") == "latest":
        older = {n: (str(have[n]), str(v)) for n, v in pins.items() if have[n] < v}
        assert not older, f"older than the lock (installed, locked): {older}"
        return
    differ = {n: (str(have[n]), str(v)) for n, v in pins.items() if have[n] != v}
    assert not differ, f"installed != locked (installed, locked): {differ}; run bash scripts/setup.sh"
    extra = sorted(set(have) - set(pins) - UNPINNED)
    assert not extra, f"installed but not in requirements.lock: {extra}; relock with bash scripts/lock.sh"
