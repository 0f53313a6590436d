"""Mixed load on `loratune serve` (whisper-base, this CPU): a 120-s file, then a short clip 1.5 s later;
prints how long each waited. Run from the repository root: `.venv/bin/python benchmarks/serve_mixed_load.py`.
"""
import sys
import threading
import time

import httpx
import numpy as np

sys.path.insert(0, "tests")
from test_serve import Server, wav_bytes

from loratune.asr.transcriber import Transcriber
from loratune.config import ServeSection, load_config
from loratune.core.audio import load_audio
from loratune.serve import create_app

cfg = load_config(None, ["model.name=whisper-base", "whisper.language=zh"])
tr = Transcriber.from_config(cfg)
dev = [f"../shared/datasets/hsk-zh/audio/hsk1-000{i}.mp3" for i in range(1, 10)]
clips = [load_audio(p) for p in dev]
long = np.concatenate(clips * 20)[: 120 * 16000]
short = clips[0]
section = ServeSection(max_upload_mb=20.0, max_audio_seconds=200.0)
done = {}
with Server(create_app(tr, section, "whisper-base")) as srv:
    url = f"{srv.url}/api/transcribe"
    def post(name, data):
        t0 = time.monotonic(); r = httpx.post(url, files={"file": (name, data, "audio/wav")}, timeout=600)
        done[name] = (time.monotonic() - t0, r.status_code)
    t = threading.Thread(target=post, args=("long.wav", wav_bytes(long))); t.start()
    time.sleep(1.5)
    post("short.wav", wav_bytes(short)); t.join()
print(f"short clip {len(short)/16000:.1f} s sent 1.5 s after a 120-s file: answered in {done['short.wav'][0]:.1f} s; the long file in {done['long.wav'][0]:.1f} s", done)
