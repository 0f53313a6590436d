"""Make a slowed copy of the HSK dev split (tempo changed, pitch kept: FFmpeg ``atempo`` through PyAV).

    PYTHONPATH=src python benchmarks/make_slow_dev.py /tmp/devslow 0.8
    loratune evaluate RECIPE model.adapter=ADAPTER data.csv=/tmp/devslow/metadata.csv data.audio_dir=/tmp/devslow/audio

A proxy for slow-rate recordings (benchmarks/ACCURACY.md rows S1-S3). Only the dev split is written;
nothing here may be trained on.
"""
from __future__ import annotations

import csv
import sys
import wave
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "hsk-zh"


def slowed(path: Path, tempo: float) -> np.ndarray:
    """16-kHz mono int16 samples of ``path`` played at ``tempo`` (pitch unchanged): loratune's own
    decoder and the ``augment.tempos`` transform, so the proxy and the augmentation are one rule."""
    from loratune.asr.augment import change_tempo
    from loratune.core.audio import load_audio

    audio = change_tempo(load_audio(path), tempo)
    return (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)


def main(out: Path, tempo: float) -> None:
    (out / "audio").mkdir(parents=True, exist_ok=True)
    with open(DATA / "metadata.csv", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "dev"]
    with open(out / "metadata.csv", "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["ID", "sentence", "split"])
        for r in rows:
            name = Path(r["ID"]).with_suffix(".wav").name
            with wave.open(str(out / "audio" / name), "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(16000)
                w.writeframes(slowed(DATA / "audio" / r["ID"], tempo).tobytes())
            writer.writerow([name, r["sentence"], "dev"])
    print(f"{len(rows)} dev clips at {tempo}x tempo -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.8)
