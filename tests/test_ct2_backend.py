"""The ctranslate2 backend against the transformers path (the reference), on the tiny random Whisper.

    python -m pytest -q tests/test_ct2_backend.py

At float32 both backends must give the same greedy transcripts (padded and trimmed input, batched
and one by one, with an adapter, with language detection); the cached CT2 copy must be reused while
the adapter is unchanged and rebuilt when its content changes; transcribe/evaluate/serve must run on
it. Every CT2 copy goes to a temp cache (LORATUNE_CACHE), never the user's.
"""
from __future__ import annotations

import asyncio
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_tiny_lora_adapter, make_tiny_whisper

from loratune.asr.ct2_model import compute_type_for, ct2_model_dir
from loratune.asr.ct2_transcriber import CT2Transcriber, full_features, trimmed_features
from loratune.asr.transcriber import Transcriber
from loratune.asr.trim import batch_num_frames
from loratune.config import load_config
from loratune.core.audio import load_audio
from loratune.errors import ConfigError

torch.set_num_threads(1)
SR = 16000


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct2b")
    base = make_tiny_whisper(root / "whisper")
    return base, make_tiny_lora_adapter(base, root / "adapter", steps=0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path_factory.getbasetemp() / "ct2-cache"))


@pytest.fixture(scope="module")
def clips(hsk_dir):
    return [load_audio(hsk_dir / "audio" / f"hsk1-000{i}.mp3") for i in range(1, 7)]


def _cfg(base, *extra):
    return load_config(None, [f"model.name={base}", "whisper.language=zh", "transcribe.compute_type=float32", "transcribe.cpu_threads=1", *extra])


def test_trimmed_features_are_the_first_frames_of_the_30s_features(models, clips):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(str(models[0]))
    frames = batch_num_frames(len(c) for c in clips)
    assert frames < 1000  # 1-5 s clips: a fraction of the 3000 frames
    np.testing.assert_array_equal(trimmed_features(fe, clips, frames), full_features(fe, clips)[..., :frames])


@pytest.mark.parametrize("trim", ["false", "true"])
def test_same_transcripts_as_transformers_at_float32(models, clips, trim):
    base, adapter = models
    cfg = _cfg(base, f"model.adapter={adapter}", f"whisper.trim_audio={trim}", "transcribe.batch_size=4")
    hf = Transcriber.from_config(cfg)
    reference = [t.text for t in hf(clips, max_new_tokens=12)]
    ct2 = CT2Transcriber.from_config(cfg)
    batched = ct2(clips, max_new_tokens=12)
    assert [t.text for t in batched] == reference and all(reference)
    # one by one (trimmed: each clip at its own length, as the transformers path does it)
    assert [ct2([c], max_new_tokens=12)[0].text for c in clips] == [hf([c], max_new_tokens=12)[0].text for c in clips]
    assert all(t.language == "zh" and t.segments[0].end == pytest.approx(len(c) / SR) for t, c in zip(batched, clips))


def test_language_detection_and_budget_match_transformers(models, clips):
    base, _ = models
    cfg = _cfg(base, "whisper.language=null", "whisper.max_tokens_per_second=2")
    ref = Transcriber.from_config(cfg)(clips[:3])
    got = CT2Transcriber.from_config(cfg)(clips[:3])
    assert [(t.language, t.text) for t in got] == [(t.language, t.text) for t in ref]


def test_cache_is_reused_and_rebuilt_when_the_adapter_changes(models, tmp_path, monkeypatch):
    import loratune.export as export

    base, adapter = models
    builds = []
    real = export.export_ctranslate2
    monkeypatch.setattr(export, "export_ctranslate2", lambda *a, **k: builds.append(a[1]) or real(*a, **k))
    own = tmp_path / "adapter"
    shutil.copytree(adapter, own)
    root = tmp_path / "cache"
    first = ct2_model_dir(str(base), str(own), "float32", root)
    assert ct2_model_dir(str(base), str(own), "float32", root) == first and len(builds) == 1  # cache hit
    assert ct2_model_dir(str(base), str(adapter), "float32", root) == first and len(builds) == 1  # keyed by content, not path
    assert ct2_model_dir(str(base), str(own), "int8", root) != first and len(builds) == 2  # keyed by quantisation
    retrained = make_tiny_lora_adapter(base, tmp_path / "retrained", seed=7, steps=0)
    shutil.copyfile(retrained / "adapter_model.safetensors", own / "adapter_model.safetensors")
    second = ct2_model_dir(str(base), str(own), "float32", root)
    assert second != first and len(builds) == 3  # same path, new content: rebuilt
    assert json.loads((second / "loratune_source.json").read_text())["adapter"] == str(own.resolve())
    from ctranslate2 import StorageView  # the two copies really hold different weights
    from ctranslate2.models import Whisper

    x = StorageView.from_array(np.ones((1, 80, 200), np.float32))
    a, b = (np.asarray(Whisper(str(d), intra_threads=1).encode(x)) for d in (first, second))
    assert not np.allclose(a, b)


def test_compute_type_choice_and_bad_values():
    assert compute_type_for("cpu") == "int8" and compute_type_for("cuda") == "int8_float16"
    with pytest.raises(ConfigError, match="transcribe.compute_type=float16 does not run on cpu"):
        compute_type_for("cpu", "float16")
    with pytest.raises(ConfigError, match="transcribe.backend"):
        load_config(None, ["transcribe.backend=onnx"])


def test_transcribe_cli_long_file_and_word_timestamps(models, hsk_dir, tmp_path):
    """A 40-s file goes through faster-whisper's windows on the same model; all four formats are written."""
    from test_transcribe import write_wav

    from loratune.transcribe import transcribe_files

    base, _ = models
    long_audio = np.concatenate([load_audio(hsk_dir / "audio" / f"hsk1-000{i}.mp3") for i in range(1, 10)] * 4)[: 40 * SR]
    write_wav(tmp_path / "long.wav", long_audio)
    shutil.copyfile(hsk_dir / "audio" / "hsk1-0001.mp3", tmp_path / "short.mp3")
    cfg = _cfg(base, f"transcribe.output_dir={tmp_path / 'out'}", "transcribe.max_new_tokens=8", "transcribe.word_timestamps=true")
    results = transcribe_files(cfg, [str(tmp_path / "long.wav"), str(tmp_path / "short.mp3")])
    assert results[str(tmp_path / "long.wav")].duration == pytest.approx(40.0)
    for stem in ("long", "short"):
        assert all((tmp_path / "out" / f"{stem}.{fmt}").is_file() for fmt in ("txt", "srt", "vtt", "json"))
        doc = json.loads((tmp_path / "out" / f"{stem}.json").read_text(encoding="utf-8"))
        segs = doc["segments"]
        assert all(0 <= s["start"] <= s["end"] <= doc["duration"] for s in segs)
        assert all("words" in s for s in segs)


def test_evaluate_on_the_ctranslate2_backend(models, hsk_dir, tmp_path, monkeypatch):
    from test_evaluate import _cfg as eval_cfg

    from loratune.asr.evaluate import evaluate

    rows = list(csv.DictReader(open(hsk_dir / "metadata.csv", encoding="utf-8-sig")))
    data = tmp_path / "metadata.csv"
    with open(data, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["ID", "sentence", "split"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("ID", "sentence", "split")} for r in [r for r in rows if r["split"] == "dev"][:4] + [r for r in rows if r["split"] == "train"][:1])
    base, adapter = models
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))  # CT2 copies and the base row: fresh
    common = [f"model.adapter={adapter}", "eval.forgetting=false", "transcribe.compute_type=float32", "whisper.trim_audio=true"]
    ref = evaluate(eval_cfg(base, data, hsk_dir, tmp_path / "hf", *common))
    got = evaluate(eval_cfg(base, data, hsk_dir, tmp_path / "ct2", *common, "eval.backend=ctranslate2"))
    for name in ("base", "adapter"):  # same numbers as the reference path
        assert got["results"][name]["cer"] == ref["results"][name]["cer"] and got["results"][name]["clips"] == 4
    hyps = [{r["ID"]: r["hypothesis"] for r in csv.DictReader(open(tmp_path / d / "predictions_adapter.csv", encoding="utf-8"))} for d in ("hf", "ct2")]
    assert hyps[0] == hyps[1]
    # again: the base row comes from the cache, and no base model is built for it
    built, real = [], CT2Transcriber.from_config.__func__
    monkeypatch.setattr(CT2Transcriber, "from_config", classmethod(lambda cls, cfg, adapter="config", **k: built.append(adapter) or real(cls, cfg, adapter, **k)))
    again = evaluate(eval_cfg(base, data, hsk_dir, tmp_path / "again", *common, "eval.backend=ctranslate2"))
    assert built == ["config"] and again["results"]["base"].pop("cached") and again["results"]["base"] == got["results"]["base"]
    assert again["results"]["adapter"]["cer"] == got["results"]["adapter"]["cer"]


def test_serve_batches_concurrent_requests_on_ctranslate2(models, hsk_dir):
    import httpx
    from test_serve import Server

    from loratune.config import ServeSection
    from loratune.serve import create_app

    tr = CT2Transcriber.from_config(_cfg(models[0]))
    calls = []
    call = tr.__call__

    def counted(audios):
        calls.append(len(audios))
        return call(audios, max_new_tokens=8)

    clips = [(hsk_dir / "audio" / f"hsk1-000{i}.mp3").read_bytes() for i in range(1, 7)]
    with Server(create_app(counted, ServeSection(batch_size=8, batch_wait_ms=300), "tiny")) as srv:
        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
                return await asyncio.gather(*[client.post("/api/transcribe", files={"file": (f"c{i}.mp3", b, "audio/mpeg")})
                                              for i, b in enumerate(clips)])

        responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200] * 6
    assert all(r.json()["language"] == "zh" and r.json()["text"] for r in responses)
    assert max(calls) >= 2 and sum(calls) == 6  # concurrent uploads shared one ctranslate2 generate


def test_bad_adapter_fails_before_any_build(models, tmp_path):
    from loratune.errors import ModelError

    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="adapter_model.safetensors is missing"):
        ct2_model_dir(str(models[0]), str(tmp_path), "int8")
    assert not (Path(tmp_path) / "ct2").exists()


def test_missing_faster_whisper_is_one_line(monkeypatch, models):
    import importlib.util

    from loratune.asr.ct2_transcriber import make_transcriber

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faster_whisper" else real(name, *a))
    with pytest.raises(ConfigError, match="transcribe.backend=transformers"):
        make_transcriber(_cfg(models[0], "transcribe.backend=ctranslate2"))


def test_auto_backend_is_ctranslate2_on_cpu_and_transformers_on_a_gpu(monkeypatch):
    import importlib.util

    import torch

    from loratune.asr.ct2_transcriber import resolve_backend

    assert load_config(None, []).transcribe.backend == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_backend("auto") == "ctranslate2"
    assert resolve_backend("transformers") == "transformers"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # run 31: transformers 4-8x ctranslate2 on an H200
    assert resolve_backend("auto") == "transformers"
    assert resolve_backend("ctranslate2") == "ctranslate2"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faster_whisper" else real(name, *a))
    assert resolve_backend("auto") == "transformers"  # a plain install without faster-whisper still transcribes
