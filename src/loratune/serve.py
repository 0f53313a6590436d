"""``loratune serve [RECIPE.yaml] [model.name=..] [model.adapter=DIR] [serve.port=8000] [key=value ...]``.

An HTTP transcription service (FastAPI + uvicorn) around one loaded Whisper (+ adapter)::

    loratune serve model.name=whisper-base whisper.language=zh
    loratune serve configs/whisper-base-hsk-qlora.yaml model.adapter=outputs/whisper-base-hsk-qlora serve.port=9000

* ``GET /`` — a small web page: pick or record audio, get the transcript.
* ``POST /api/transcribe`` — multipart field ``file``; answers ``{"text", "language", "duration",
  "segments": [{"start", "end", "text"}], ...}``. Errors are 4xx with ``{"detail": message}``:
  400 empty upload or a NUL byte in the file name, 401 without the token (when ``serve.token`` /
  ``LORATUNE_SERVE_TOKEN`` is set), 413 over ``serve.max_upload_mb`` (counted while the body streams
  in, so a chunked upload is never spooled whole) or ``serve.max_audio_seconds``, 415 not decodable
  audio, 422 silent audio or a clip under 0.3 s. A bad request never takes the server down.
* ``GET /api/health`` — status and batching counters; ``GET /docs`` / ``/openapi.json`` — the API.

Binds 127.0.0.1 unless ``serve.host`` says otherwise; any other address needs a token. Requests that arrive together are decoded
together: a worker takes the first queued request, waits up to ``serve.batch_wait_ms`` for
up to ``serve.batch_size - 1`` more, and runs one batched ``generate`` in a thread, so the event
loop keeps accepting uploads meanwhile. Files over 30 s (Whisper's sequential long-form loop) have a
queue and worker of their own, so a short clip never waits behind a long file. The model runs on
``transcribe.backend`` (``auto`` by default: ctranslate2 on a CPU, one batched ``generate`` per batch;
transformers on a CUDA GPU).
"""
# no `from __future__ import annotations`: FastAPI reads the endpoint annotations, which name
# classes imported inside create_app (lazy imports keep `loratune --help` fast)

import asyncio
import hmac
import logging
import os
import tempfile
import time
from pathlib import Path

from loratune.errors import DataError

log = logging.getLogger(__name__)

# the config sections this verb reads: `loratune serve --help` lists only these
SECTIONS = ("model", "quant", "whisper", "transcribe", "serve")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>loratune transcribe</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#222}
 h1{font-size:1.4rem} .row{display:flex;gap:.6rem;align-items:center;flex-wrap:wrap;margin:.8rem 0}
 button{padding:.45rem 1rem;font-size:1rem;cursor:pointer} #status{color:#666}
 #transcript{white-space:pre-wrap;border:1px solid #ccc;border-radius:6px;padding:1rem;min-height:3rem;font-size:1.25rem}
 .err{color:#b00020} small{color:#666}
</style></head><body>
<h1>loratune &middot; speech to text</h1>
<p><small>model: <code>__MODEL__</code> &middot; up to __MAXMB__ MB / __MAXS__ s per file &middot; <a href="/docs">API</a></small></p>
<div class="row" id="tokenrow" style="display:__TOKEN_UI__"><label>API token <input id="token" type="password" autocomplete="off"></label></div>
<form id="form" class="row">
 <input id="file" name="file" type="file" accept="audio/*,.wav,.flac,.mp3,.ogg,.m4a,.webm">
 <button id="send" type="submit">Transcribe</button>
 <button id="record" type="button">&#9679; Record</button>
</form>
<div id="status"></div>
<h2 style="font-size:1.1rem">Transcript</h2>
<div id="transcript"></div>
<script>
const out = document.getElementById('transcript'), status = document.getElementById('status');
async function send(blob, name) {
  status.textContent = 'transcribing ' + name + ' ...'; out.classList.remove('err'); out.textContent = '';
  const fd = new FormData(); fd.append('file', blob, name);
  const t0 = performance.now();
  try {
    const tok = document.getElementById('token').value;
    const r = await fetch('/api/transcribe', {method: 'POST', body: fd, headers: tok ? {'Authorization': 'Bearer ' + tok} : {}});
    const j = await r.json();
    if (!r.ok) { out.classList.add('err'); out.textContent = 'Error ' + r.status + ': ' + j.detail; status.textContent = ''; return; }
    out.textContent = j.text || '(no speech recognised)';
    status.textContent = name + ': ' + j.duration.toFixed(1) + ' s of audio, language ' + j.language +
      ', answered in ' + ((performance.now() - t0) / 1000).toFixed(1) + ' s';
  } catch (e) { out.classList.add('err'); out.textContent = String(e); status.textContent = ''; }
}
document.getElementById('form').addEventListener('submit', ev => {
  ev.preventDefault();
  const f = document.getElementById('file').files[0];
  if (!f) { status.textContent = 'choose an audio file first'; return; }
  send(f, f.name);
});
let rec = null, chunks = [];
document.getElementById('record').addEventListener('click', async ev => {
  const btn = ev.target;
  if (rec && rec.state === 'recording') { rec.stop(); btn.innerHTML = '&#9679; Record'; return; }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({audio: true});
    rec = new MediaRecorder(stream); chunks = [];
    rec.ondataavailable = e => chunks.push(e.data);
    rec.onstop = () => { stream.getTracks().forEach(t => t.stop()); send(new Blob(chunks, {type: rec.mimeType}), 'recording.webm'); };
    rec.start(); btn.innerHTML = '&#9632; Stop'; status.textContent = 'recording ... press Stop to transcribe';
  } catch (e) { status.textContent = 'microphone not available: ' + e; }
});
</script></body></html>
"""


LONG_SECONDS = 30.0  # Whisper's window: longer files are decoded window by window


class Batcher:
    """Collects concurrent requests into batches for one model worker."""

    def __init__(self, transcriber, batch_size: int, wait_ms: int):
        self.transcriber, self.batch_size, self.wait = transcriber, max(1, batch_size), wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self.long_queue: asyncio.Queue = asyncio.Queue()
        self.batches = 0
        self.max_batch = 0
        self.requests = 0

    async def submit(self, audio):
        fut = asyncio.get_running_loop().create_future()
        # files over one 30-s window go through the sequential long-form loop: they get their own
        # queue and worker, so a short clip never waits behind a long file (only beside it)
        long = len(audio) > LONG_SECONDS * 16000
        await (self.long_queue if long else self.queue).put((audio, fut))
        return await fut

    async def run(self) -> None:
        await asyncio.gather(self._worker(self.queue, self.batch_size), self._worker(self.long_queue, 1))

    async def _worker(self, queue: asyncio.Queue, batch_size: int) -> None:
        while True:
            items = [await queue.get()]
            deadline = time.monotonic() + self.wait
            while len(items) < batch_size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            self.batches += 1
            self.requests += len(items)
            self.max_batch = max(self.max_batch, len(items))
            try:
                results = await asyncio.to_thread(self.transcriber, [a for a, _ in items])
            except Exception as exc:  # noqa: BLE001 - one failed batch must not stop the worker
                log.exception("transcription batch failed")
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), res in zip(items, results):
                if not fut.done():
                    fut.set_result(res)


class CapBody:
    """ASGI middleware: count the request body of ``/api/transcribe`` as it streams in and stop at
    ``max_bytes`` with a 413, so a chunked upload without Content-Length is never spooled whole."""

    def __init__(self, app, max_bytes: int, limit_mb: float):
        self.app, self.max_bytes, self.limit_mb = app, max_bytes, limit_mb

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/api/transcribe":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException

        seen = 0

        async def capped():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI turns this into the 413 response
                    raise HTTPException(413, f"upload is over the {self.limit_mb:g}-MB limit")
            return message

        await self.app(scope, capped, send)


class UploadError(Exception):
    """An upload the service refuses: HTTP ``status`` and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


STATUS = {"empty": 400, "too_long": 413, "too_short": 422, "silent": 422}


def decode_upload(data: bytes, filename: str, max_seconds: float, min_rms: float):
    """Bytes of an uploaded file -> checked 16-kHz audio; UploadError (status + message) otherwise."""
    from loratune.asr.transcriber import audio_problem
    from loratune.core.audio import load_audio

    name = filename or "upload"
    suffix = "".join(c for c in Path(name).suffix[:10] if c.isalnum() or c == ".") or ".bin"
    fd, tmp = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        try:
            audio = load_audio(tmp)
        except DataError as exc:  # not decodable as audio
            raise UploadError(415, str(exc).replace(tmp, name)) from exc
    finally:
        os.unlink(tmp)
    problem = audio_problem(audio, max_seconds, min_rms, "serve.max_audio_seconds")
    if problem:
        raise UploadError(STATUS[problem[0]], f"{name}: {problem[1]}")
    return audio


def create_app(transcriber, opts, model_label: str = "whisper", min_rms: float = 1e-4):
    """The FastAPI app; ``opts`` is a :class:`loratune.config.ServeSection`."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, File, HTTPException, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse

    max_bytes = int(opts.max_upload_mb * 1024 * 1024)
    token = opts.token or os.environ.get("LORATUNE_SERVE_TOKEN") or None

    @asynccontextmanager
    async def lifespan(app):
        app.state.batcher = Batcher(transcriber, opts.batch_size, opts.batch_wait_ms)
        worker = asyncio.create_task(app.state.batcher.run())
        yield
        worker.cancel()

    app = FastAPI(
        title="loratune transcription",
        version="1",
        description=f"Whisper speech-to-text ({model_label}). Upload audio to `/api/transcribe`.",
        lifespan=lifespan,
    )

    app.add_middleware(CapBody, max_bytes=max_bytes + 64 * 1024, limit_mb=opts.max_upload_mb)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        # /api/* needs the token when one is set; the page itself is public (it asks for the token)
        if token and request.url.path.startswith("/api/"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"detail": "missing or wrong API token: send Authorization: Bearer <token>"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.middleware("http")
    async def cap_upload_size(request: Request, call_next):
        # refuse big uploads from the header, before the multipart body is read at all
        length = request.headers.get("content-length")
        if request.url.path == "/api/transcribe" and length and length.isdigit() and int(length) > max_bytes + 64 * 1024:
            return JSONResponse({"detail": f"upload of {int(length) / 2**20:.1f} MB is over the {opts.max_upload_mb:g}-MB limit"}, status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return (PAGE.replace("__MODEL__", model_label).replace("__MAXMB__", f"{opts.max_upload_mb:g}")
                .replace("__MAXS__", f"{opts.max_audio_seconds:g}").replace("__TOKEN_UI__", "flex" if token else "none"))

    @app.get("/api/health", summary="Service status and batching counters")
    async def health() -> dict:
        b = app.state.batcher
        return {"status": "ok", "model": model_label, "requests": b.requests, "batches": b.batches, "max_batch": b.max_batch}

    @app.post(
        "/api/transcribe",
        summary="Transcribe one audio file",
        responses={400: {"description": "empty upload"}, 413: {"description": "file too large or audio too long"},
                   415: {"description": "not decodable audio"}, 422: {"description": "silent audio"}},
    )
    async def transcribe(file: UploadFile = File(..., description="audio: wav, flac, mp3, ogg, m4a, webm ...")) -> dict:
        if "\x00" in (file.filename or ""):
            raise HTTPException(400, "the upload's file name holds a NUL byte; rename the file")
        data = await file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"upload is over the {opts.max_upload_mb:g}-MB limit")
        if not data:
            raise HTTPException(400, f"{file.filename}: empty upload (0 bytes)")
        try:
            audio = await asyncio.to_thread(decode_upload, data, file.filename, opts.max_audio_seconds, min_rms)
        except UploadError as exc:
            raise HTTPException(exc.status, str(exc)) from exc
        start = time.perf_counter()
        result = await app.state.batcher.submit(audio)
        return {**result.to_dict(), "model": model_label, "processing_seconds": round(time.perf_counter() - start, 3)}

    return app


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_exposure(opts) -> None:
    """Beyond loopback, a token is required (ConfigError before the model loads)."""
    from loratune.errors import ConfigError

    if opts.host not in LOOPBACK and not (opts.token or os.environ.get("LORATUNE_SERVE_TOKEN")):
        raise ConfigError(f"serve.host={opts.host} exposes the service beyond this machine; set serve.token=... "
                          "or LORATUNE_SERVE_TOKEN (clients send Authorization: Bearer <token>)")


def main(inv) -> int:
    import uvicorn

    from loratune.asr.ct2_transcriber import make_transcriber

    cfg = inv.config()
    check_exposure(cfg.serve)  # before the model loads
    transcriber = make_transcriber(cfg)  # transcribe.backend: auto (ctranslate2 on CPU, transformers on GPU)
    label = cfg.model.name + (f" + {cfg.model.adapter}" if cfg.model.adapter else "")
    app = create_app(transcriber, cfg.serve, label, cfg.transcribe.min_rms)
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="info")
    return 0
