"""Shared fixtures. Tests run offline on the CPU with one thread each so parallel jobs don't thrash."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
HSK_DIR = REPO.parent / "shared" / "datasets" / "hsk-zh"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def hsk_dir() -> Path:
    if not (HSK_DIR / "metadata.csv").is_file():
        pytest.fail(f"{HSK_DIR} is missing: the shared dataset must sit beside the checkout")
    return HSK_DIR


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A tiny random multilingual Whisper (tests/tiny.py), built once per session, read-only."""
    from tiny import make_tiny_whisper

    return make_tiny_whisper(tmp_path_factory.mktemp("tiny_whisper"))


@pytest.fixture(scope="session")
def hsk_csv(tmp_path_factory, hsk_dir):
    """Factory: ``hsk_csv(n)`` = a CSV (ID, sentence) of the first n HSK train clips, made once per n."""
    from test_asr_data import hsk_clips, write_csv

    made = {}

    def make(n: int) -> Path:
        if n not in made:
            made[n] = write_csv(tmp_path_factory.mktemp(f"hsk_{n}") / "clips.csv", hsk_clips(hsk_dir, n))
        return made[n]

    return make
