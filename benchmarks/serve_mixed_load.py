"""Mixed load on `loratune serve` (whisper-base, this CPU): a 120-s file, then a short clip 1.5 s later;
prints how long each waited. Run from the repository root: `.venv/bin/python benchmarks/serve_mixed_load.py`.
"""
import sys
import threading
import time

import httpx
import numpy as np

sys.path.insert(0, "tests")
from test_serve import Server, wav_bytes  # noqa: E402  (the tests' in-process uvicorn server)

from loratune.asr.transcriber import Transcriber  # noqa: E402
from loratune.config import ServeSection, load_config  # noqa: E402
from loratune.core.audio import load_audio  # noqa: E402
from loratune.serve import create_app  # noqa: E402


def main() -> None:
    tr = Transcriber.from_config(load_config(None, ["model.name=whisper-base", "whisper.language=zh"]))
    clips = [load_audio(f"../shared/datasets/hsk-zh/audio/hsk1-000{i}.mp3") for i in range(1, 10)]
    long = np.concatenate(clips * 20)[: 120 * 16000]
    short = clips[0]
    done = {}
    with Server(create_app(tr, ServeSection(max_upload_mb=20.0, max_audio_seconds=200.0), "whisper-base")) as srv:
        url = f"{srv.url}/api/transcribe"

        def post(name, data):
            t0 = time.monotonic()
            r = httpx.post(url, files={"file": (name, data, "audio/wav")}, timeout=600)
            done[name] = (time.monotonic() - t0, r.status_code)

        worker = threading.Thread(target=post, args=("long.wav", wav_bytes(long)))
        worker.start()
        time.sleep(1.5)
        post("short.wav", wav_bytes(short))
        worker.join()
    print(f"short clip {len(short) / 16000:.1f} s sent 1.5 s after a 120-s file: answered in {done['short.wav'][0]:.1f} s; "
          f"the long file in {done['long.wav'][0]:.1f} s", done)


if __name__ == "__main__":
    main()
