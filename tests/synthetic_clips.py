"""Synthetic ASR corpora as parquet shards (tests and benchmarks/data_scale.py): short generated clips
(a tone + noise, FLAC in datasets' Audio column) with random character transcripts.

    from synthetic_clips import write_shards
    files = write_shards(folder, n_clips=1000, shard_rows=500, seed=0)   # folder/train-00000.parquet ...
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import List, Optional

import numpy as np

SR = 16_000
CHARS = "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"


def clip(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A tone at a random pitch with white noise, float32 in [-1, 1]."""
    t = np.arange(int(seconds * SR)) / SR
    tone = 0.3 * np.sin(2 * np.pi * rng.uniform(150, 900) * t)
    return (tone + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def flac_bytes(audio: np.ndarray) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio, SR, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def write_shards(folder, n_clips: int, shard_rows: int = 1000, seed: int = 0, min_s: float = 1.0, max_s: float = 2.0,
                 bad: Optional[dict] = None, prefix: str = "train") -> List[Path]:
    """``n_clips`` rows (ID, audio, sentence) in shards of ``shard_rows``; ``bad`` = {row: "empty"|"corrupt"}
    makes those rows bad (an empty transcript / audio bytes no decoder reads)."""
    from datasets import Audio, Dataset, Features, Value

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # the Audio column is written from its storage (bytes + path): encoding through datasets needs torchcodec
    feats = Features({"ID": Value("string"), "audio": {"bytes": Value("binary"), "path": Value("string")},
                      "sentence": Value("string")})
    files = []
    for start in range(0, n_clips, shard_rows):
        rows = {"ID": [], "audio": [], "sentence": []}
        for i in range(start, min(n_clips, start + shard_rows)):
            kind = (bad or {}).get(i)
            data = b"not audio at all" if kind == "corrupt" else flac_bytes(clip(rng, rng.uniform(min_s, max_s)))
            text = "" if kind == "empty" else "".join(rng.choice(list(CHARS), size=int(rng.integers(4, 13))))
            rows["ID"].append(f"clip{i:06d}")
            rows["audio"].append({"bytes": data, "path": f"clip{i:06d}.flac"})
            rows["sentence"].append(text)
        path = folder / f"{prefix}-{start // shard_rows:05d}.parquet"
        ds = Dataset.from_dict(rows, features=feats).cast_column("audio", Audio(sampling_rate=SR, decode=False))
        ds.to_parquet(str(path))
        files.append(path)
    return files
