"""ASR data layer: collator, CSV / Hub / save_to_disk sources, splits, row validation, feature cache.

Run: python -m pytest -q tests/test_asr_data.py   (offline, CPU, no model weights needed)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from loratune.asr import features as asr
from loratune.asr.collator import WhisperCollator
from loratune.asr.features import prepare_asr_data
from loratune.config import load_config
from loratune.errors import DataError

SR = 16_000
SOT = 50258  # <|startoftranscript|> of the multilingual tokenizer


def sine(path: Path, seconds: float, freq: float = 440.0) -> Path:
    t = np.arange(int(seconds * SR)) / SR
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR)
    return path


def hsk_clips(hsk_dir: Path, n: int):
    """First n train rows of the shared HSK set: (file name, sentence)."""
    import csv

    with open(hsk_dir / "metadata.csv", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh) if r["split"] == "train"]
    return [(r["ID"], r["sentence"]) for r in rows[:n]]


def write_csv(path: Path, rows, header=("ID", "sentence"), encoding="utf-8", bom=False) -> Path:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode(encoding)
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return path


def sine_set(folder: Path, n: int = 6, seconds=(1.0, 1.6, 0.7, 2.2, 1.3, 0.9)):
    """n sine clips in folder/audio + a CSV with transcripts and a train/dev split column."""
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        sine(folder / "audio" / f"c{i}.wav", seconds[i % len(seconds)], 220 + 40 * i)
        rows.append((f"c{i}.wav", f"你好{i}", "dev" if i >= n - 2 else "train"))
    return write_csv(folder / "data.csv", rows, header=("ID", "sentence", "split"))


@pytest.fixture(scope="module")
def processor():
    from tiny import whisper_tokenizer
    from transformers import WhisperFeatureExtractor, WhisperProcessor

    return WhisperProcessor(WhisperFeatureExtractor(feature_size=80), whisper_tokenizer())


def cfg_for(tmp_path, *overrides):
    return load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", *overrides])


# ---------------------------------------------------------------------------------------------
# collator


def test_collator_pads_labels_and_strips_start_token():
    coll = WhisperCollator(decoder_start_token_id=SOT)
    feats = np.zeros((80, 3000), np.float32)
    batch = coll([{"input_features": feats, "labels": [SOT, 1, 2, 3]}, {"input_features": feats, "labels": [SOT, 7]}])
    assert batch["labels"].tolist() == [[1, 2, 3], [7, -100, -100]]
    assert batch["input_features"].shape == (2, 80, 3000)
    # not every sequence starts with it -> nothing stripped
    batch = coll([{"input_features": feats, "labels": [SOT, 1]}, {"input_features": feats, "labels": [5, 6, 7]}])
    assert batch["labels"].tolist() == [[SOT, 1, -100], [5, 6, 7]]


def test_collator_pads_time_with_each_examples_minimum():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(80, 100)).astype(np.float32)
    b = rng.normal(size=(80, 37)).astype(np.float32) - 3.0
    batch = WhisperCollator(decoder_start_token_id=None)([{"input_features": a, "labels": [1]}, {"input_features": b, "labels": [2]}])
    x = batch["input_features"].numpy()
    assert x.shape == (2, 80, 100)
    np.testing.assert_array_equal(x[1, :, :37], b)
    assert np.all(x[1, :, 37:] == b.min()) and b.min() != a.min()
    # frames-major storage (the cache layout) gives the same batch
    same = WhisperCollator(frames_major=True)([{"input_features": a.T, "labels": [1]}, {"input_features": b.T, "labels": [2]}])
    np.testing.assert_array_equal(same["input_features"].numpy(), x)


def test_trimmed_features_match_the_30s_log_mel(tmp_path, processor):
    """Trimmed = first ceil(s*100) frames (even) of the padded log-mel; the collator's padding equals
    the padded log-mel wherever the STFT window no longer reaches the clip (frame >= n + 2)."""
    csv_path = write_csv(tmp_path / "d.csv", [("a.wav", "一"), ("b.wav", "二"), ("c.wav", "三")])
    for name, sec in (("a.wav", 1.234), ("b.wav", 2.5), ("c.wav", 0.8)):
        sine(tmp_path / name, sec, 300)
    cfg = cfg_for(tmp_path, f"data.csv={csv_path}", "whisper.trim_audio=true", "data.eval_ratio=0.34")
    data = prepare_asr_data(cfg, processor)
    rows = {r: f for r, f in zip(list(data.train["ref"]) + list(data.eval["ref"]), list(data.train["input_features"]) + list(data.eval["input_features"]))}
    short = np.asarray(rows["d.csv line 2"], np.float32).T  # a.wav, 1.234 s
    assert short.shape == (80, 124)  # ceil(123.4) = 124, already even
    assert np.asarray(rows["d.csv line 4"]).shape[0] == 80  # c.wav 0.8 s -> 80 frames
    full = processor.feature_extractor(sf.read(tmp_path / "a.wav", dtype="float32")[0], sampling_rate=SR, return_tensors="np").input_features[0]
    np.testing.assert_allclose(short, full[:, :124], rtol=0, atol=1e-6)
    long = np.asarray(rows["d.csv line 3"], np.float32).T  # 250 frames
    batch = WhisperCollator()([{"input_features": short, "labels": [1]}, {"input_features": long, "labels": [1]}])
    padded = batch["input_features"][0].numpy()
    np.testing.assert_allclose(padded[:, 126:250], full[:, 126:250], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# sources and splits


def test_csv_with_and_without_bom_custom_columns_and_audio_dir(tmp_path, processor):
    audio = tmp_path / "wavs"
    audio.mkdir()
    for i in range(4):
        sine(audio / f"x{i}.wav", 0.5 + 0.1 * i)
    rows = [(f"x{i}.wav", f"句子{i}") for i in range(4)]
    plain = write_csv(tmp_path / "plain.csv", rows, header=("file", "text"))
    bom = write_csv(tmp_path / "bom.csv", rows, header=("file", "text"), bom=True)
    got = []
    for path in (plain, bom):
        cfg = cfg_for(tmp_path, f"data.csv={path}", "data.audio_dir=wavs", "data.id_column=file", "data.text_column=text", "data.eval_ratio=0.25")
        # audio_dir is relative: not under the cwd, so it resolves beside the CSV
        train, ev = asr.load_raw_splits(cfg.data)
        got.append(sorted(list(train[asr.TEXT])) + sorted(list(ev[asr.TEXT])))
        assert all(Path(p).is_file() for p in list(train[asr.AUDIO]))
    assert got[0] == got[1] and len(got[0]) == 4
    # default audio folder: <csv folder>/audio
    sine_set(tmp_path / "set")
    train, ev = asr.load_raw_splits(cfg_for(tmp_path, f"data.csv={tmp_path / 'set' / 'data.csv'}", "data.eval_split=dev").data)
    assert all(Path(p).is_file() and Path(p).parent.name == "audio" for p in list(train[asr.AUDIO]))


def test_split_column_then_ratio_and_seeded_subsets(tmp_path):
    path = sine_set(tmp_path, n=10)
    train, ev = asr.load_raw_splits(cfg_for(tmp_path, f"data.csv={path}", "data.eval_split=dev").data)
    assert sorted(list(ev[asr.TEXT])) == ["你好8", "你好9"] and len(train) == 8
    # split column present, no eval split named -> seeded ratio split of the train rows
    a = asr.load_raw_splits(cfg_for(tmp_path, f"data.csv={path}", "data.eval_ratio=0.25").data)
    b = asr.load_raw_splits(cfg_for(tmp_path, f"data.csv={path}", "data.eval_ratio=0.25").data)
    c = asr.load_raw_splits(cfg_for(tmp_path, f"data.csv={path}", "data.eval_ratio=0.25", "data.seed=7").data)
    assert list(a[1][asr.TEXT]) == list(b[1][asr.TEXT]) and len(a[0]) == 6 and len(a[1]) == 2
    assert "你好9" not in list(a[0][asr.TEXT]) + list(a[1][asr.TEXT])  # dev rows never used for training
    assert list(a[1][asr.TEXT]) != list(c[1][asr.TEXT]) or list(a[0][asr.TEXT]) != list(c[0][asr.TEXT])
    # no split column at all -> ratio split of everything
    write_csv(tmp_path / "nosplit.csv", [(f"audio/c{i}.wav", f"t{i}") for i in range(10)])
    tr, ev2 = asr.load_raw_splits(cfg_for(tmp_path, f"data.csv={tmp_path / 'nosplit.csv'}", "data.eval_ratio=0.2").data)
    assert (len(tr), len(ev2)) == (8, 2)
    sub1 = asr.load_raw_splits(cfg_for(tmp_path, f"data.csv={path}", "data.eval_split=dev", "data.max_train_samples=3").data)[0]
    sub2 = asr.load_raw_splits(cfg_for(tmp_path, f"data.csv={path}", "data.eval_split=dev", "data.max_train_samples=3").data)[0]
    assert len(sub1) == 3 and list(sub1[asr.TEXT]) == list(sub2[asr.TEXT])


def _dataset_dict(folder: Path):
    from datasets import Audio, Dataset, DatasetDict

    def part(name, n):
        paths = [str(sine(folder / f"{name}{i}.wav", 0.6 + 0.2 * i)) for i in range(n)]
        ds = Dataset.from_dict({"audio": paths, "sentence": [f"{name}{i}" for i in range(n)], "client_id": ["x"] * n})
        return ds.cast_column("audio", Audio(sampling_rate=48_000))  # as Common Voice ships it

    return DatasetDict(train=part("train", 3), validation=part("validation", 2), test=part("test", 2))


def test_save_to_disk_and_hub_style_folder_with_joined_splits(tmp_path, processor):
    dd = _dataset_dict(tmp_path)
    dd.save_to_disk(str(tmp_path / "saved"))
    cfg = cfg_for(tmp_path, f"data.disk={tmp_path / 'saved'}", "data.train_split=train+validation", "data.eval_split=test")
    data = prepare_asr_data(cfg, processor)
    assert (len(data.train), len(data.eval)) == (5, 2)
    assert data.train.column_names == ["input_features", "labels", "input_length", "ref"]  # unused columns removed
    # the Hub code path (load_dataset by name): a local folder of parquet files stands in offline
    hub = tmp_path / "hub"
    hub.mkdir()
    for split, ds in dd.items():
        ds.to_parquet(str(hub / f"{split}.parquet"))
    cfg = cfg_for(tmp_path, f"data.hub={hub}", "data.train_split=train+validation", "data.eval_split=test")
    data = prepare_asr_data(cfg, processor)
    assert (len(data.train), len(data.eval)) == (5, 2)
    # audio decoded at 16 kHz: a 0.6-s clip has 9,600 samples whatever the cast rate said
    assert sorted(list(data.train["input_length"]))[0] == 9600
    with pytest.raises(DataError, match=r"split train\+dev.*Unknown split"):
        prepare_asr_data(cfg_for(tmp_path, f"data.hub={hub}", "data.train_split=train+dev"), processor)
    with pytest.raises(DataError, match=r"no split 'dev'.*data.train_split"):
        prepare_asr_data(cfg_for(tmp_path, f"data.disk={tmp_path / 'saved'}", "data.train_split=train+dev"), processor)


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the row/file and the fix, before any training


def _one_line(exc_info, *fragments):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


@pytest.fixture
def bad_set(tmp_path):
    """Two good clips + one row per kind of bad input (each kind tested on its own below)."""
    (tmp_path / "audio").mkdir()
    sine(tmp_path / "audio" / "ok1.wav", 1.0)
    sine(tmp_path / "audio" / "ok2.wav", 1.2)
    sine(tmp_path / "audio" / "ok3.wav", 1.1)
    sine(tmp_path / "audio" / "ok4.wav", 1.3)
    sine(tmp_path / "audio" / "long.wav", 31.0)
    (tmp_path / "audio" / "corrupt.mp3").write_bytes(b"ID3 this is not audio at all" * 50)
    sine(tmp_path / "audio" / "empty_text.wav", 0.5)
    sine(tmp_path / "audio" / "wordy.wav", 0.5)
    good = [("ok1.wav", "好"), ("ok2.wav", "好好")]
    bad = {
        "missing": ("gone.wav", "不在"),
        "corrupt": ("corrupt.mp3", "坏"),
        "empty": ("empty_text.wav", "  "),
        "long": ("long.wav", "长"),
        "tokens": ("wordy.wav", "这是一个非常长的句子" * 100),
    }
    return tmp_path, good, bad


@pytest.mark.parametrize(
    "kind, fragments",
    [
        ("missing", ["gone.wav", "audio file not found", "data.skip_bad_rows"]),
        ("corrupt", ["corrupt.mp3", "cannot decode", "skip_bad_rows"]),
        ("empty", ["line 4", "empty transcript", "skip_bad_rows"]),
        ("long", ["long.wav", "31.0 s", "max_audio_seconds=30", "skip_bad_rows"]),
        ("tokens", ["wordy.wav", "448-token", "skip_bad_rows"]),
    ],
)
def test_each_bad_row_is_a_one_line_error(bad_set, processor, kind, fragments):
    folder, good, bad = bad_set
    path = write_csv(folder / f"{kind}.csv", good + [bad[kind]])
    cfg = cfg_for(folder, f"data.csv={path}", "data.eval_ratio=0.34")
    with pytest.raises(DataError) as info:
        prepare_asr_data(cfg, processor)
    _one_line(info, f"{kind}.csv line 4", *fragments)
    assert not any((folder / "cache").glob("*/meta.json"))  # nothing cached from a failed run


def test_skip_bad_rows_drops_and_counts_them(bad_set, processor, caplog):
    folder, good, bad = bad_set
    path = write_csv(folder / "all.csv", good + [("ok3.wav", "好"), ("ok4.wav", "好好")] + list(bad.values()))
    # two feature workers: their errors come back as counted skips too
    cfg = cfg_for(folder, f"data.csv={path}", "data.skip_bad_rows=true", "data.eval_ratio=0.3", "data.num_proc=2")
    with caplog.at_level("WARNING"):
        data = prepare_asr_data(cfg, processor)
    assert len(data.train) + len(data.eval) == 4
    assert data.report["skipped"] == {"missing audio": 1, "unreadable audio": 1, "empty transcript": 1,
                                      "audio too long": 1, "transcript too long": 1}
    assert "skipped 5 bad rows of 9" in caplog.text


def test_missing_column_non_utf8_and_empty_after_filtering(tmp_path, processor):
    sine_set(tmp_path)
    path = write_csv(tmp_path / "cols.csv", [("audio/c0.wav", "x")], header=("file", "sentence"))
    with pytest.raises(DataError) as info:
        prepare_asr_data(cfg_for(tmp_path, f"data.csv={path}"), processor)
    _one_line(info, "cols.csv", "no column 'ID'", "data.id_column")
    gbk = write_csv(tmp_path / "gbk.csv", [("audio/c0.wav", "中文句子")], encoding="gbk")
    with pytest.raises(DataError) as info:
        prepare_asr_data(cfg_for(tmp_path, f"data.csv={gbk}"), processor)
    _one_line(info, "gbk.csv", "not UTF-8", "line 2", "iconv")
    allbad = write_csv(tmp_path / "allbad.csv", [("nope1.wav", "a"), ("nope2.wav", "b"), ("nope3.wav", "c")])
    with pytest.raises(DataError) as info:
        prepare_asr_data(cfg_for(tmp_path, f"data.csv={allbad}", "data.skip_bad_rows=true"), processor)
    _one_line(info, "no usable training rows", "3 missing audio")


# ---------------------------------------------------------------------------------------------
# feature cache


def test_second_run_reuses_the_feature_cache(tmp_path, processor, monkeypatch):
    path = sine_set(tmp_path)
    cfg = cfg_for(tmp_path, f"data.csv={path}", "data.eval_split=dev")
    first = prepare_asr_data(cfg, processor)
    assert first.report["cache_hit"] is False

    def no_reprocessing(*a, **k):
        raise AssertionError("features were extracted again")

    monkeypatch.setattr(asr, "_features", no_reprocessing)
    second = prepare_asr_data(cfg, processor)
    assert second.report["cache_hit"] is True and second.report["cache_dir"] == first.report["cache_dir"]
    np.testing.assert_array_equal(np.asarray(list(second.train["input_features"])[0]), np.asarray(list(first.train["input_features"])[0]))
    assert list(second.train["labels"]) == list(first.train["labels"])
    # a changed clip, transcript or feature option is a different key -> processed again
    sine(tmp_path / "audio" / "c0.wav", 1.5, 500)
    with pytest.raises(AssertionError, match="extracted again"):
        prepare_asr_data(cfg, processor)
    sine(tmp_path / "audio" / "c0.wav", 1.0, 220)  # content back, but the mtime is new
    with pytest.raises(AssertionError, match="extracted again"):
        prepare_asr_data(cfg_for(tmp_path, f"data.csv={path}", "data.eval_split=dev", "whisper.trim_audio=true"), processor)


def test_labels_carry_the_language_and_task_prefix(tmp_path, processor):
    path = sine_set(tmp_path, n=4)
    data = prepare_asr_data(cfg_for(tmp_path, f"data.csv={path}", "data.eval_split=dev"), processor)
    tok = processor.tokenizer
    text = tok.decode(list(data.train["labels"])[0])
    assert text.startswith("<|startoftranscript|><|zh|><|transcribe|><|notimestamps|>你好") and text.endswith("<|endoftext|>")
