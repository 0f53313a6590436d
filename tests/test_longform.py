"""``transcribe.long_form=vad``: long files cut at pauses (Silero VAD) and decoded as short clips.

    python -m pytest -q tests/test_longform.py

Real HSK speech joined with silences checks where the VAD cuts; the tiny random Whisper checks that
both backends decode the chunks exactly as they would decode the same chunks given as clips, and that
segments land at the chunks' places in the file.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from tiny import make_tiny_lora_adapter, make_tiny_whisper

from loratune.asr.longform import join_texts, resolve_long_form, speech_chunks, transcribe_chunked
from loratune.asr.transcriber import Segment, Transcriber, Transcript
from loratune.config import load_config
from loratune.core.audio import load_audio
from loratune.errors import ConfigError

torch.set_num_threads(1)
SR = 16000
GAP = 1.0  # seconds of silence between the joined clips


@pytest.fixture(scope="module")
def joined(hsk_dir):
    """(audio, [(start, end)] of each clip in samples): 14 HSK clips with 1-s pauses, over 30 s."""
    clips = [load_audio(f) for f in sorted((hsk_dir / "audio").glob("hsk1-*.mp3"))[:14]]
    parts, spans, pos = [], [], 0
    for c in clips:
        parts += [c, np.zeros(int(GAP * SR), np.float32)]
        spans.append((pos, pos + len(c)))
        pos += len(c) + int(GAP * SR)
    audio = np.concatenate(parts)
    assert len(audio) > 30 * SR
    return audio, spans


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("longform")
    base = make_tiny_whisper(root / "whisper")
    return base, make_tiny_lora_adapter(base, root / "adapter", steps=0)


def test_chunks_cut_in_the_pauses_and_merge_up_to_the_limit(joined):
    audio, spans = joined
    # the default: every pause ends a chunk, so one chunk a clip, every cut inside a pause
    one_each = speech_chunks(audio, max_seconds=10.0)
    assert len(one_each) == len(spans)
    for (cs, ce), (s, e) in zip(one_each, spans):
        assert s - 0.5 * SR <= cs <= s + 0.3 * SR and e - 0.3 * SR <= ce <= e + 0.5 * SR
    merged = speech_chunks(audio, max_seconds=10.0, merge_seconds=8.0)
    assert 1 < len(merged) < len(spans)
    assert all((e - s) / SR <= 8.0 for s, e in merged)
    assert all(a[1] <= b[0] for a, b in zip(merged, merged[1:]))  # in order, no overlap
    # every clip lies inside one chunk (no word cut at a chunk border)
    assert all(any(cs <= s + 0.3 * SR and e - 0.3 * SR <= ce for cs, ce in merged) for s, e in spans)
    assert speech_chunks(np.zeros(40 * SR, np.float32), 10.0) == []
    # one long stretch of speech without a pause is cut at the limit
    talk = np.concatenate([audio[s:e] for s, e in spans])
    cut = speech_chunks(talk, max_seconds=4.0)
    assert len(cut) >= len(talk) / SR / 4.0 and all((e - s) / SR <= 4.0 + 0.5 for s, e in cut)


def test_transcribe_chunked_places_segments_and_joins_text():
    audio = np.zeros(60 * SR, np.float32)
    chunks = [(0, 3 * SR), (10 * SR, 12 * SR), (20 * SR, 29 * SR)]
    seen = []

    def decode(clips):
        seen.append([len(c) for c in clips])
        return [Transcript(f"c{len(c) // SR}", "zh", len(c) / SR, [Segment(0.0, len(c) / SR, f"c{len(c) // SR}")]) for c in clips]

    t = transcribe_chunked(audio, chunks, decode, batch_size=2, language="zh")
    assert seen == [[2 * SR, 3 * SR], [9 * SR]]  # shortest first, two a batch
    assert [(s.start, s.end, s.text) for s in t.segments] == [(0.0, 3.0, "c3"), (10.0, 12.0, "c2"), (20.0, 29.0, "c9")]
    assert t.text == "c3c2c9" and t.duration == 60.0
    assert join_texts(["Hello there.", "", "Bye."], "en") == "Hello there. Bye."
    empty = transcribe_chunked(audio, [], decode, 4, "zh")
    assert empty.text == "" and empty.segments == []


def test_auto_is_vad_only_for_short_clip_adapters(monkeypatch):
    assert load_config(None, []).transcribe.long_form == "auto"
    assert resolve_long_form("auto", trim_audio=True) == "vad"
    assert resolve_long_form("auto", trim_audio=False) == "sequential"
    assert resolve_long_form("sequential", trim_audio=True) == "sequential"
    with pytest.raises(ConfigError, match="transcribe.chunk_seconds=45"):
        load_config(None, ["transcribe.chunk_seconds=45"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "faster_whisper" else real(name, *a))
    assert resolve_long_form("auto", trim_audio=True) == "sequential"  # no Silero VAD: the 30-s loop, with a log line
    with pytest.raises(ConfigError, match="long_form=vad needs faster-whisper"):
        resolve_long_form("vad", trim_audio=True)


@pytest.mark.parametrize("backend", ["transformers", "ctranslate2"])
def test_vad_long_form_decodes_chunks_as_clips(models, joined, backend, tmp_path_factory, monkeypatch):
    from loratune.asr.ct2_transcriber import make_transcriber

    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path_factory.getbasetemp() / "ct2-cache"))
    base, adapter = models
    audio, _ = joined
    cfg = load_config(None, [f"model.name={base}", f"model.adapter={adapter}", "whisper.language=zh", "whisper.trim_audio=true",
                             f"transcribe.backend={backend}", "transcribe.compute_type=float32", "transcribe.cpu_threads=1",
                             "transcribe.batch_size=1"])
    t = make_transcriber(cfg)
    assert t.long_form == "vad"
    long = t([audio], max_new_tokens=8)[0]
    chunks = speech_chunks(audio, cfg.transcribe.chunk_seconds)
    alone = [t([audio[s:e]], max_new_tokens=8)[0].text for s, e in chunks]
    assert len(chunks) >= 3 and long.text and len(long.segments) >= 2
    assert [round(s.start, 3) for s in long.segments] == [round(s / SR, 3) for (s, e), a in zip(chunks, alone) if a]
    assert long.text == "".join(alone)  # the same text as each chunk transcribed as a clip of its own
    assert all(a.end <= b.start for a, b in zip(long.segments, long.segments[1:]))
    # a 20-s file (under Whisper's 30 s, over chunk_seconds) is chunked too: given to a short-clip
    # adapter as one clip, a file of many sentences kept only the first ones (CER 0.86, issue 15 rows)
    mid = audio[: 20 * SR]
    mid_chunks = speech_chunks(mid, cfg.transcribe.chunk_seconds)
    assert len(mid_chunks) >= 3
    assert t([mid], max_new_tokens=8)[0].text == "".join(t([mid[s:e]], max_new_tokens=8)[0].text for s, e in mid_chunks)
    if backend == "transformers":  # the reference loop is still there when asked for
        t.long_form = "sequential"
        assert isinstance(t([audio], max_new_tokens=8)[0], Transcript)
        assert isinstance(t, Transcriber)


def test_gate_long_form_check_compares_the_same_clips(models, hsk_dir):
    """evaluate's long-form gate: files joined from test clips go through the transcriber's long-form
    path (vad for a short-clip adapter); the clip-by-clip CER it compares with is of the same clips."""
    from types import SimpleNamespace

    from loratune.asr.evaluate import long_form_check
    from loratune.core.metrics import score

    base, adapter = models
    cfg = load_config(None, [f"model.name={base}", f"model.adapter={adapter}", "whisper.language=zh", "whisper.trim_audio=true",
                             "transcribe.backend=transformers"])
    t = Transcriber.from_config(cfg)
    files = sorted((hsk_dir / "audio").glob("hsk2-*.mp3"))[:40]
    test = SimpleNamespace(audios=[load_audio(f) for f in files], texts=[f"参考{i}" for i in range(len(files))])
    hyps = [x.text for x in t(test.audios, max_new_tokens=8)]
    r = long_form_check(t, test, hyps, "cer", "zh", minutes=0.5)
    assert r["long_form_files"] == 2 and r["long_form_mode"] == "vad" and r["long_form_timestamps_ok"]
    assert r["long_form_seconds"] >= 60
    # the clips the two files hold, in order, until each file passed 30 s
    n, used, total = 0, [], 0
    for a in test.audios:
        total += len(a) + SR // 2
        n += 1
        if total >= 30 * SR:
            used.append(n)
            total = 0
            if len(used) == 2:
                break
    cuts = [(0, used[0]), (used[0], used[1])]
    clip_rate = score(["".join(test.texts[a:b]) for a, b in cuts], ["".join(hyps[a:b]) for a, b in cuts], "cer", "zh")[0]
    assert r["long_form_clip_cer"] == pytest.approx(clip_rate, abs=1e-6)
    assert r["long_form_cer_gap"] == pytest.approx(r["long_form_cer"] - r["long_form_clip_cer"], abs=2e-6)
