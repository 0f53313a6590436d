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
