"""Re-make src/loratune/resources/general/: 20 English HSK dev sentences spoken by espeak-ng.

    apt-get install espeak-ng && .venv/bin/python scripts/make_general_set.py

The forgetting check of `loratune evaluate` (eval.forgetting) transcribes these with base and
adapter in their own language; the sentences come from dev rows only, never from train.
"""
import csv
import io
import random
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "hsk-zh" / "metadata.csv"
OUT = ROOT / "src" / "loratune" / "resources" / "general"


def main() -> None:
    rows = [r for r in csv.DictReader(open(DATA, encoding="utf-8")) if r["split"] == "dev"]
    rows = [r for r in rows if 4 <= len(r["english"].split()) <= 12]
    random.Random(7).shuffle(rows)
    out = []
    for i, r in enumerate(rows[:20]):
        voice = ["en-us", "en-gb"][i % 2]
        wav = subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "--stdout", r["english"]],
                             capture_output=True, check=True).stdout
        audio, sr = sf.read(io.BytesIO(wav))
        n = int(len(audio) * 16000 / sr)  # espeak-ng writes 22,050 Hz; linear resampling is enough for speech
        audio16 = np.interp(np.linspace(0, len(audio) - 1, n), np.arange(len(audio)), audio).astype(np.float32)
        name = f"en-{i:02d}.flac"
        sf.write(OUT / name, audio16, 16000, format="FLAC")
        out.append({"file": name, "language": "en", "text": r["english"], "source_id": r["ID"]})
    with open(OUT / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(out[0]))
        writer.writeheader()
        writer.writerows(out)


if __name__ == "__main__":
    main()
