"""loratune serve: a real uvicorn server with the tiny Whisper, driven by httpx clients and by a
real headless Chromium (Debian's /usr/bin/chromium through Playwright)."""
from __future__ import annotations

import asyncio
import io
import shutil
import socket
import threading
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_tiny_whisper

from loratune.asr.transcriber import Transcriber
from loratune.config import ServeSection, load_config
from loratune.serve import create_app

torch.set_num_threads(1)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def wav_bytes(audio: np.ndarray, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sr)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


class Server:
    """uvicorn in a background thread on a free local port."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def _serve(model_name: str, **opts):
    cfg = load_config(None, [f"model.name={model_name}", "whisper.language=zh"])
    tr = Transcriber.from_config(cfg)
    if model_name != "whisper-base":  # random tiny model: keep its babble short
        call = tr.__call__
        tr = lambda audios: call(audios, max_new_tokens=8)  # noqa: E731
    section = ServeSection(**{"max_upload_mb": 2.0, "max_audio_seconds": 20.0, "batch_size": 8, "batch_wait_ms": 300, **opts})
    return Server(create_app(tr, section, model_name))


@pytest.fixture(scope="module")
def tiny_server(tmp_path_factory):
    base = make_tiny_whisper(tmp_path_factory.mktemp("tiny") / "whisper")
    with _serve(str(base)) as srv:
        yield srv


def test_default_bind_is_localhost():
    assert load_config().serve.host == "127.0.0.1"


def test_concurrent_clients_are_batched(tiny_server, hsk_dir):
    import httpx

    clips = [(hsk_dir / "audio" / f"hsk1-000{i}.mp3").read_bytes() for i in range(1, 7)]

    async def run():
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=120) as client:
            return await asyncio.gather(*[client.post("/api/transcribe", files={"file": (f"c{i}.mp3", b, "audio/mpeg")}) for i, b in enumerate(clips)])

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 6
    for r in responses:
        body = r.json()
        assert body["language"] == "zh" and 0.5 < body["duration"] < 10 and isinstance(body["text"], str)
    health = httpx.get(f"{tiny_server.url}/api/health").json()
    assert health["requests"] >= 6 and health["max_batch"] >= 2  # concurrent uploads shared a generate call


def test_bad_uploads_get_4xx_and_server_survives(tiny_server, hsk_dir):
    import httpx

    url = f"{tiny_server.url}/api/transcribe"
    cases = [
        ("empty.wav", b"", 400, "empty"),
        ("notes.mp3", b"this is not audio at all" * 10, 415, "cannot decode"),
        ("silence.wav", wav_bytes(np.zeros(32000, np.float32)), 422, "silent"),
        ("blip.wav", wav_bytes(0.1 * np.sin(np.arange(1600) / 7)), 422, "under the 0.3 s"),
        ("long.wav", wav_bytes(0.1 * np.sin(np.arange(25 * 16000) / 7)), 413, "20-s limit; cut it or raise serve.max_audio_seconds"),
        ("huge.wav", b"\0" * (3 * 1024 * 1024), 413, "MB"),
    ]
    for name, data, status, msg in cases:
        r = httpx.post(url, files={"file": (name, data, "application/octet-stream")}, timeout=60)
        assert r.status_code == status, (name, r.text)
        assert msg in r.json()["detail"]
    assert httpx.post(url, timeout=30).status_code == 422  # no file field at all
    ok = httpx.post(url, files={"file": ("ok.mp3", (hsk_dir / "audio" / "hsk1-0001.mp3").read_bytes(), "audio/mpeg")}, timeout=60)
    assert ok.status_code == 200


def test_openapi_documents_the_api(tiny_server):
    import httpx

    spec = httpx.get(f"{tiny_server.url}/openapi.json").json()
    assert "/api/transcribe" in spec["paths"] and "/api/health" in spec["paths"]
    assert {"413", "415", "422"} <= set(spec["paths"]["/api/transcribe"]["post"]["responses"])
    assert httpx.get(f"{tiny_server.url}/docs").status_code == 200


def _browser_upload(url: str, audio_file: Path, screenshot: Path) -> str:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.goto(url)
            assert "loratune" in page.title()
            page.set_input_files("#file", str(audio_file))
            page.click("#send")
            page.wait_for_function("document.getElementById('status').textContent.includes('answered')", timeout=180_000)
            text = page.inner_text("#transcript")
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            # a non-audio file shows the server's message on the page
            bad = audio_file.parent / "not-audio.mp3"
            bad.write_text("plain text")
            page.set_input_files("#file", str(bad))
            page.click("#send")
            page.wait_for_function("document.getElementById('transcript').textContent.startsWith('Error 415')", timeout=60_000)
            return text
        finally:
            browser.close()


@pytest.mark.browser
def test_browser_upload_tiny(tiny_server, hsk_dir, tmp_path):
    assert shutil.which(CHROMIUM), "chromium missing: run scripts/setup.sh (apt-get install chromium)"
    text = _browser_upload(tiny_server.url, hsk_dir / "audio" / "hsk1-0002.mp3", tmp_path / "shot.png")
    assert text.strip() and (tmp_path / "shot.png").stat().st_size > 5000


@pytest.mark.browser
@pytest.mark.slow
def test_browser_upload_whisper_base_screenshot(hsk_dir, repo_root, tmp_path):
    """Real weights: the page shows the Chinese transcript; the screenshot goes to docs/."""
    from loratune.core.metrics import cer

    shot = repo_root / "docs" / "serve-screenshot.png"
    clip = tmp_path / "hsk1-0002.mp3"
    clip.write_bytes((hsk_dir / "audio" / "hsk1-0002.mp3").read_bytes())
    with _serve("whisper-base") as srv:
        text = _browser_upload(srv.url, clip, shot)
    assert cer(["你好，很高兴认识你。"], [text]) < 0.3, text
    assert shot.stat().st_size > 10000


def test_cli_serve_binds_localhost_by_default(monkeypatch):
    import uvicorn

    import loratune.asr.transcriber
    from loratune.cli import main

    seen = {}
    import loratune.asr.ct2_transcriber

    monkeypatch.setattr(loratune.asr.transcriber.Transcriber, "from_config", classmethod(lambda cls, cfg: object()))
    monkeypatch.setattr(loratune.asr.ct2_transcriber.CT2Transcriber, "from_config", classmethod(lambda cls, cfg: object()))  # the default backend
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    assert main(["serve", "model.name=anything"]) == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000
    monkeypatch.delenv("LORATUNE_SERVE_TOKEN", raising=False)
    assert main(["serve", "model.name=anything", "serve.port=9123", "serve.host=0.0.0.0"]) == 2  # beyond loopback: token needed
    assert main(["serve", "model.name=anything", "serve.port=9123", "serve.host=0.0.0.0", "serve.token=t0k"]) == 0
    assert seen["host"] == "0.0.0.0" and seen["port"] == 9123


def test_chunked_upload_is_capped_while_reading_and_nul_names_are_400(tiny_server):
    """A body without Content-Length is counted as it streams: 413 after ~the cap, not after spooling
    it all; a NUL byte in the file name is a 400, not a 500."""
    import httpx

    url = f"{tiny_server.url}/api/transcribe"
    sent = {"bytes": 0}
    boundary = "loratuneboundary"

    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.wav\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        chunk = b"\0" * (256 * 1024)
        for _ in range(200):  # 50 MB offered, 2 MB allowed
            sent["bytes"] += len(chunk)
            yield chunk
        yield f"\r\n--{boundary}--\r\n".encode()

    r = httpx.post(url, content=body(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=60)
    assert r.status_code == 413 and "MB limit" in r.json()["detail"]
    raw = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\x00b.wav\"\r\n"
           "Content-Type: audio/wav\r\n\r\n").encode() + wav_bytes(0.1 * np.sin(np.arange(16000) / 7)) + f"\r\n--{boundary}--\r\n".encode()
    r = httpx.post(url, content=raw, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=60)
    assert r.status_code == 400 and "NUL" in r.json()["detail"], r.text
    assert httpx.get(f"{tiny_server.url}/api/health", timeout=10).status_code == 200  # still up


def test_token_is_required_beyond_loopback_and_checked(tmp_path, monkeypatch):
    import httpx

    from loratune.errors import ConfigError
    from loratune.serve import check_exposure

    monkeypatch.delenv("LORATUNE_SERVE_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="serve.host=0.0.0.0 exposes the service.*serve.token"):
        check_exposure(ServeSection(host="0.0.0.0"))
    check_exposure(ServeSection(host="0.0.0.0", token="s3cret"))
    check_exposure(ServeSection())  # loopback needs none
    base = make_tiny_whisper(tmp_path / "whisper")
    with _serve(str(base), token="s3cret") as srv:
        url = f"{srv.url}/api/transcribe"
        clip = ("a.wav", wav_bytes(0.1 * np.sin(np.arange(16000) / 7)), "audio/wav")
        assert httpx.post(url, files={"file": clip}, timeout=60).status_code == 401
        assert httpx.post(url, files={"file": clip}, headers={"Authorization": "Bearer wrong"}, timeout=60).status_code == 401
        assert httpx.post(url, files={"file": clip}, headers={"Authorization": "Bearer s3cret"}, timeout=60).status_code == 200
        page = httpx.get(srv.url, timeout=10)
        assert page.status_code == 200 and 'id="tokenrow" style="display:flex"' in page.text


def test_cap_body_stops_reading_at_the_limit():
    """The ASGI layer under the 413 above: the app below sees no byte past the cap (the client may
    still send the rest; the server neither reads nor spools it)."""
    from starlette.exceptions import HTTPException

    from loratune.serve import CapBody

    chunks = [{"type": "http.request", "body": b"x" * 1000, "more_body": True} for _ in range(100)]
    pulled = []

    async def receive():
        msg = chunks[len(pulled)]
        pulled.append(msg)
        return msg

    async def app(scope, recv, send):
        while True:
            await recv()

    async def run():
        with pytest.raises(HTTPException) as info:
            await CapBody(app, max_bytes=5500, limit_mb=0.005)({"type": "http", "path": "/api/transcribe"}, receive, None)
        return info.value

    import asyncio

    exc = asyncio.run(run())
    assert exc.status_code == 413 and len(pulled) == 6  # 6,000 bytes read: stopped at the first chunk past 5,500


def test_short_clips_do_not_wait_behind_a_long_file(tmp_path):
    """A 120-s file (made slow here: 3 s) and a 1.6-s clip sent just after it: the clip's answer comes
    back while the long file is still being decoded (it used to share the long file's batch)."""
    import threading
    import time

    import httpx

    base = make_tiny_whisper(tmp_path / "whisper")
    cfg = load_config(None, [f"model.name={base}", "whisper.language=zh"])
    tr = Transcriber.from_config(cfg)

    def slow_for_long(audios):
        if any(len(a) > 30 * 16000 for a in audios):
            time.sleep(3.0)
        return tr(audios, max_new_tokens=4)

    section = ServeSection(max_upload_mb=20.0, max_audio_seconds=200.0, batch_size=8, batch_wait_ms=300)
    done = {}
    with Server(create_app(slow_for_long, section, "tiny")) as srv:
        url = f"{srv.url}/api/transcribe"
        long = wav_bytes(0.1 * np.sin(np.arange(120 * 16000) / 7))
        short = wav_bytes(0.1 * np.sin(np.arange(int(1.6 * 16000)) / 5))

        def post(name, data):
            r = httpx.post(url, files={"file": (name, data, "audio/wav")}, timeout=60)
            done[name] = (time.monotonic(), r.status_code)

        t = threading.Thread(target=post, args=("long.wav", long))
        t.start()
        time.sleep(0.5)
        sent = time.monotonic()
        post("short.wav", short)
        t.join()
    assert done["long.wav"][1] == done["short.wav"][1] == 200
    assert done["short.wav"][0] < done["long.wav"][0]
    assert done["short.wav"][0] - sent < 2.5  # not the long file's 3 s
