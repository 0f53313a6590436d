"""loratune transcribe: formats, batching, long-form, language handling and bad input.

Fast tests use the tiny random Whisper (mechanics only); the slow test transcribes a ~2-minute
file made by joining real HSK dev clips with the packaged whisper-base and scores it.
"""
from __future__ import annotations

import csv
import json
import re
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_tiny_lora_adapter, make_tiny_whisper

from loratune.asr.transcriber import Transcriber, check_audio
from loratune.cli import main as cli
from loratune.config import load_config
from loratune.console import quiet_libraries
from loratune.core.audio import load_audio
from loratune.errors import ConfigError, DataError
from loratune.transcribe import transcribe_files

torch.set_num_threads(1)
SR = 16000


def write_wav(path: Path, audio: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("tiny") / "whisper")


@pytest.fixture(scope="module")
def tiny_transcriber(base) -> Transcriber:
    cfg = load_config(None, [f"model.name={base}", "whisper.language=zh"])
    return Transcriber.from_config(cfg)


def _cfg(base, out, *extra):
    return load_config(None, [f"model.name={base}", f"transcribe.output_dir={out}", "whisper.language=zh", "transcribe.max_new_tokens=24", *extra])


SRT_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)$")


def _srt_spans(text: str):
    spans = []
    for line in text.splitlines():
        m = SRT_TIME.match(line)
        if m:
            g = list(map(int, m.groups()))
            spans.append((g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000, g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000))
    return spans


def test_files_and_folders_all_formats(base, tiny_transcriber, hsk_dir, tmp_path):
    folder = tmp_path / "in" / "sub"
    folder.mkdir(parents=True)
    for name in ("hsk1-0001.mp3", "hsk1-0002.mp3"):
        (folder / name).write_bytes((hsk_dir / "audio" / name).read_bytes())
    # a 40-s file: forces Whisper's long-form path next to the batched short clips
    long_audio = np.concatenate([load_audio(hsk_dir / "audio" / f"hsk1-000{i}.mp3") for i in range(1, 10)] * 4)[: 40 * SR]
    write_wav(tmp_path / "long.wav", long_audio)
    (tmp_path / "notes.txt").write_text("not audio: folders are searched for audio extensions only")
    out = tmp_path / "out"
    results = transcribe_files(_cfg(base, out, "transcribe.batch_size=2"), [str(tmp_path / "in"), str(tmp_path / "long.wav")], tiny_transcriber)
    assert len(results) == 3
    # under transcribe.output_dir the input folders' structure is kept (relative to their common folder)
    for stem in ("in/sub/hsk1-0001", "in/sub/hsk1-0002", "long"):
        assert {p.suffix for p in out.glob(f"{stem}.*")} == {".txt", ".srt", ".vtt", ".json"}
        data = json.loads((out / f"{stem}.json").read_text(encoding="utf-8"))
        assert data["language"] == "zh" and data["text"] == (out / f"{stem}.txt").read_text(encoding="utf-8").strip()
        spans = _srt_spans((out / f"{stem}.srt").read_text(encoding="utf-8"))
        assert len(spans) == len(data["segments"])
        assert all(0 <= s <= e <= data["duration"] + 0.01 for s, e in spans)
        assert [s for s, _ in spans] == sorted(s for s, _ in spans)
        vtt = (out / f"{stem}.vtt").read_text(encoding="utf-8")
        assert vtt.startswith("WEBVTT\n") and vtt.count(" --> ") == len(spans)
    assert json.loads((out / "long.json").read_text())["duration"] == pytest.approx(40.0, abs=0.01)


def test_batched_equals_one_by_one(tiny_transcriber, hsk_dir):
    clips = [load_audio(hsk_dir / "audio" / f"hsk1-000{i}.mp3") for i in range(1, 5)]
    batched = [t.text for t in tiny_transcriber(clips, max_new_tokens=10)]
    single = [tiny_transcriber([c], max_new_tokens=10)[0].text for c in clips]
    assert batched == single


def test_language_detection_and_adapter_changes_output(base, hsk_dir, tmp_path):
    from tiny import LANGS

    clip = load_audio(hsk_dir / "audio" / "hsk1-0003.mp3")
    detected = Transcriber.from_config(load_config(None, [f"model.name={base}", "whisper.language=null"]))([clip], max_new_tokens=6)[0]
    assert detected.language in LANGS
    adapter = make_tiny_lora_adapter(base, tmp_path / "adapter", steps=0)
    plain = Transcriber.from_config(load_config(None, [f"model.name={base}", "whisper.language=zh"]))([clip], max_new_tokens=10)[0]
    tuned = Transcriber.from_config(load_config(None, [f"model.name={base}", f"model.adapter={adapter}", "whisper.language=zh"]))([clip], max_new_tokens=10)[0]
    assert plain.text != tuned.text


def test_bad_inputs(base, tiny_transcriber, hsk_dir, tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "fake.mp3").write_text("this is text, not audio")
    write_wav(tmp_path / "silent.wav", np.zeros(2 * SR, np.float32))
    clip = tmp_path / "ok.mp3"
    clip.write_bytes((hsk_dir / "audio" / "hsk1-0001.mp3").read_bytes())
    out = tmp_path / "out"
    for name, msg in (("empty.wav", "empty"), ("fake.mp3", "cannot decode"), ("silent.wav", "silent"), ("nope.wav", "no such file")):
        with pytest.raises(DataError, match=msg):
            transcribe_files(_cfg(base, out), [str(tmp_path / name)], tiny_transcriber)
    with pytest.raises(DataError, match="over the 1-s limit"):
        transcribe_files(_cfg(base, out, "transcribe.max_audio_seconds=1"), [str(clip)], tiny_transcriber)
    with pytest.raises(ConfigError, match="transcribe.formats"):
        transcribe_files(_cfg(base, out, "transcribe.formats=[docx]"), [str(clip)], tiny_transcriber)
    assert not out.exists()  # nothing was written before the checks passed
    # skip_bad_files: bad ones are reported, the good one is transcribed
    res = transcribe_files(_cfg(base, out, "transcribe.skip_bad_files=true"), [str(tmp_path)], tiny_transcriber)
    assert list(res) == [str(clip)] and (out / "ok.txt").is_file()
    # the CLI turns these into one line and exit status 2, before loading any model
    assert cli(["transcribe", f"model.name={base}", str(tmp_path / "silent.wav")]) == 2
    assert cli(["transcribe", f"model.name={base}", "whisper.language=klingon", str(clip)]) == 2


def test_check_audio_limits():
    tone = (0.1 * np.sin(np.arange(SR) / 5)).astype(np.float32)
    assert check_audio(tone, "t", 2.0) is tone
    with pytest.raises(DataError, match="zero samples"):
        check_audio(np.zeros(0, np.float32), "t", 2.0)
    with pytest.raises(DataError, match="7200 s long.*raise transcribe.max_audio_seconds"):  # a 2-hour file, 1-hour limit
        check_audio(np.full(7200 * SR, 0.1, np.float32), "t", load_config().transcribe.max_audio_seconds)  # the default cap
    with pytest.raises(DataError, match="0.10 s long, under the 0.3 s"):  # a blip Whisper would answer with a sentence
        check_audio(tone[: SR // 10], "t", 2.0)


@pytest.mark.slow
def test_long_form_two_minutes_of_hsk_with_whisper_base(hsk_dir, tmp_path):
    """~2 minutes of dev clips joined into one file: long-form vs per-clip transcription CER."""
    from loratune.core.metrics import score

    rows = [r for r in csv.DictReader(open(hsk_dir / "metadata.csv", encoding="utf-8-sig")) if r["split"] == "dev"]
    gap = np.zeros(int(0.4 * SR), np.float32)
    clips, refs, total = [], [], 0
    for r in rows:
        a = load_audio(hsk_dir / "audio" / r["ID"])
        clips.append(a)
        refs.append(r["sentence"])
        total += len(a) + len(gap)
        if total > 120 * SR:
            break
    joined = write_wav(tmp_path / "joined.wav", np.concatenate([np.concatenate([c, gap]) for c in clips]))
    cfg = _cfg("whisper-base", tmp_path / "out", "transcribe.max_new_tokens=null")
    tr = Transcriber.from_config(cfg)
    long = transcribe_files(cfg, [str(joined)], tr)[str(joined)]
    assert long.duration > 120 and len(long.segments) > 4
    per_clip = [t.text for i in range(0, len(clips), 8) for t in tr(clips[i : i + 8], max_new_tokens=64)]
    ref = "".join(refs)
    long_rate, (long_items,) = score([ref], [long.text], "cer", "zh")
    clip_rate, (clip_items,) = score([ref], ["".join(per_clip)], "cer", "zh")
    print(f"\n{len(clips)} clips, {long.duration:.1f} s: long-form CER {long_rate:.4f} {long_items.counts}; per-clip CER {clip_rate:.4f} {clip_items.counts}")
    # lost or doubled words at the 30-s window borders would show up as extra deletions/insertions
    assert long_rate <= clip_rate + 0.03
    assert long_items.counts.deletions <= clip_items.counts.deletions + 5
    assert long_items.counts.insertions <= clip_items.counts.insertions + 5
    ends = [s.end for s in long.segments]
    assert ends == sorted(ends) and ends[-1] <= long.duration + 0.5


def test_token_budget_and_no_generation_warnings(tiny_transcriber, hsk_dir):
    """One generation config per call: the same tokens as a plain ``generate(max_new_tokens=N)``, and
    none of transformers' per-batch warnings (no attention mask; max_new_tokens beside max_length)."""
    import logging

    clips = [load_audio(hsk_dir / "audio" / f"hsk1-000{i}.mp3") for i in range(1, 4)]
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        texts = [t.text for t in tiny_transcriber(clips, max_new_tokens=7)]
        ours = [r.getMessage()[:60] for r in records]
        records.clear()
        quiet_libraries()  # what the loratune command does: hides transformers' own Whisper notice
        tiny_transcriber(clips, max_new_tokens=7)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in ours if "attention mask" in m or "seem to have been set" in m], ours
    assert [r.getMessage()[:60] for r in records] == []
    t = tiny_transcriber
    x, _ = t._features(clips, long_form=False)
    with torch.inference_mode():
        ref = t.model.generate(input_features=x, language="zh", task="transcribe", max_new_tokens=7)
    assert texts == [s.strip() for s in t.tokenizer.batch_decode(ref, skip_special_tokens=True)]
    assert ref.shape[-1] <= 4 + 7


def test_duration_budget_and_no_repeat_ngram(tiny_transcriber):
    """whisper.max_tokens_per_second caps a clip's tokens by its duration; no_repeat_ngram_size
    reaches the generation config (the tiny random model repeats itself without it)."""
    t = tiny_transcriber
    one_second = np.random.default_rng(0).normal(0, 0.1, SR).astype(np.float32)
    free = t._generation_config(40)
    assert free.max_length == 40 and not free.no_repeat_ngram_size
    t.max_tokens_per_second, t.no_repeat_ngram_size = 2.0, 2
    try:
        seen = {}
        original = t.model.generate

        def spy(*args, **kwargs):
            seen.update(max_length=kwargs["generation_config"].max_length,
                        no_repeat=kwargs["generation_config"].no_repeat_ngram_size)
            return original(*args, **kwargs)

        t.model.generate = spy
        t([one_second], max_new_tokens=40)
    finally:
        t.max_tokens_per_second, t.no_repeat_ngram_size = None, 0
        del t.model.generate
    assert seen == {"max_length": 2 + 4, "no_repeat": 2}


def test_output_names_never_collide(tmp_path):
    """a.mp3 + a.wav in one folder, and x.wav in two subfolders, each get their own transcripts."""
    from loratune.transcribe import output_stems

    files = [tmp_path / "a.mp3", tmp_path / "a.wav", tmp_path / "b.wav", tmp_path / "d1" / "x.wav", tmp_path / "d2" / "x.wav"]
    beside = output_stems(files, None)
    assert beside[files[0]] == tmp_path / "a.mp3" and beside[files[1]] == tmp_path / "a.wav" and beside[files[2]] == tmp_path / "b"
    assert beside[files[3]] == tmp_path / "d1" / "x" and beside[files[4]] == tmp_path / "d2" / "x"
    out = tmp_path / "out"
    under = output_stems(files, str(out))
    assert len(set(under.values())) == len(files)
    assert under[files[3]] == out / "d1" / "x" and under[files[4]] == out / "d2" / "x" and under[files[2]] == out / "b"
