"""Streaming ASR corpora (``data.streaming=true``): rows from parquet shards decoded, checked and counted
as they pass, the same examples as the audio cache, options refused with their fix, a tiny Whisper
training from a stream, and ``--resume`` feeding the same batches a straight run would.

Run: python -m pytest -q tests/test_streaming.py
"""
from __future__ import annotations

import numpy as np
import pytest
from synthetic_clips import write_shards

from loratune.config import load_config
from loratune.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """20 clean clips in 3 shards, and 12 clips with an empty transcript (row 3) and corrupt audio (row 9)."""
    root = tmp_path_factory.mktemp("shards")
    write_shards(root / "clean", 20, shard_rows=8, seed=1)
    write_shards(root / "bad", 12, shard_rows=6, seed=2, bad={3: "empty", 9: "corrupt"})
    return root


def _cfg(tiny, glob, *extra):
    return load_config(None, [f"model.name={tiny}", "data.streaming=true", f"data.parquet={glob}", "train.max_steps=4",
                              "train.batch_size=2", "train.eval_strategy=no", "train.report_to=[none]", "train.threads=1",
                              "train.logging_steps=1", *extra])


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=-1", "train.max_steps must say how many"),
    ("train.warmup_epochs=0.2", "set train.warmup_epochs=0 and train.warmup_steps=N"),
    ("train.eval_strategy=epoch", "set train.eval_strategy=steps train.eval_steps=N"),
    ("train.group_by_length=true", "set train.group_by_length=false"),
])
def test_options_a_stream_cannot_honour_are_refused_with_the_fix(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.streaming=true", "data.parquet=x.parquet", "train.max_steps=10", "train.eval_strategy=no",
                           override])
    with pytest.raises(ConfigError, match="reads data.parquet or data.hub only"):
        load_config(None, ["data.streaming=true", "data.csv=a.csv", "train.max_steps=10", "train.eval_strategy=no"])


def test_stream_yields_the_examples_the_audio_cache_holds(tiny, shards, tmp_path):
    from loratune.asr.features import prepare_asr_data
    from loratune.asr.model import load_processor
    from loratune.asr.stream import prepare_streaming_asr

    glob = shards / "clean" / "*.parquet"
    processor = load_processor(str(tiny))
    stream = prepare_streaming_asr(_cfg(tiny, glob, "data.shuffle_buffer=0"), processor)
    assert stream.eval is None and not hasattr(stream.train, "__len__")  # the Trainer must see a length-less stream
    it = iter(stream.train)
    streamed = [next(it) for _ in range(25)]  # 20 rows, then the second pass starts over
    cached = prepare_asr_data(load_config(None, [f"model.name={tiny}", f"data.parquet={glob}", "data.features=audio",
                                                 f"data.cache_dir={tmp_path}", "data.eval_ratio=0.05"]), processor)
    by_id = {r.split("ID=")[1].rstrip(")"): i for i, r in enumerate(x["ref"] for x in streamed[:20])}
    assert len(by_id) == 20 and stream.report["stream"]["passes"] == 2
    for row in cached.train.with_format("numpy"):
        ex = streamed[by_id[_id_of(row)]]
        assert np.array_equal(ex["audio"], row["audio"]) and list(ex["labels"]) == list(row["labels"])
    assert [x["ref"].split("ID=")[1] for x in streamed[20:]] == [x["ref"].split("ID=")[1] for x in streamed[:5]]


def _id_of(row):
    """The cache names rows by position (``... row N``); the shards hold clipNNNNNN in that order."""
    return f"clip{int(row['ref'].rsplit(' row ', 1)[1]):06d}"


def test_bad_rows_stop_the_run_naming_the_row_or_are_counted_as_they_pass(tiny, shards):
    from loratune.asr.model import load_processor
    from loratune.asr.stream import prepare_streaming_asr

    glob = shards / "bad" / "*.parquet"
    processor = load_processor(str(tiny))
    data = prepare_streaming_asr(_cfg(tiny, glob, "data.shuffle_buffer=0"), processor)  # nothing is read up front
    with pytest.raises(DataError, match=r"example 3 \(ID=clip000003\).*empty transcript; fill in the text or set data.skip_bad_rows=true"):
        list(iter(data.train))
    data = prepare_streaming_asr(_cfg(tiny, glob, "data.skip_bad_rows=true", "data.shuffle_buffer=0"), processor)
    it = iter(data.train)
    first_pass = [next(it) for _ in range(10)]
    assert data.report["skipped"] == {"empty transcript": 1, "unreadable audio": 1}
    assert data.report["stream"] == {"rows_read": 12, "rows_used": 10, "passes": 1}
    assert {"clip000003", "clip000009"}.isdisjoint(x["ref"].split("ID=")[1].rstrip(")") for x in first_pass)


def test_tiny_whisper_trains_from_a_stream_with_held_out_validation(tiny, shards, tmp_path):
    from loratune.asr.train import train

    out = tmp_path / "run"
    cfg = _cfg(tiny, shards / "bad" / "*.parquet", "data.skip_bad_rows=true", "train.max_steps=6",
               "train.eval_strategy=steps", "train.eval_steps=3", "data.max_eval_samples=4", "augment.gain_db=3",
               f"train.output_dir={out}")
    summary = train(cfg)
    assert summary["global_step"] == 6 and summary["eval_loss"] > 0 and (out / "adapter_model.safetensors").is_file()
    assert summary["eval_examples"] == 3  # the 4 held-out front rows, one of them (row 3) empty
    # rows 4..11 train (row 9 bad): 7 good rows per pass, 12 examples used over two passes
    assert summary["stream"]["rows_used"] >= 12 and summary["skipped_by_reason"]["unreadable audio"] >= 1
    assert (out / "checkpoint-3").is_dir() and (out / "checkpoint-6").is_dir()


def test_resume_sees_the_batches_a_straight_run_sees(tiny, shards, tmp_path, monkeypatch):
    """12 steps straight vs 3 steps + --resume to 12, recording the labels of every trained batch. 20 rows /
    batch 2 = 10 batches a pass (4-example shuffle buffer): the resumed run skips 3 batches into pass 1 and
    goes on into the reshuffled pass 2."""
    import loratune.asr.train as asr_train
    from loratune.asr.train import train

    seen = []
    real = asr_train.token_mean_loss

    def recording(outputs, labels, *a, **k):
        seen.append(labels.tolist())
        return real(outputs, labels, *a, **k)

    monkeypatch.setattr(asr_train, "token_mean_loss", recording)
    glob = shards / "clean" / "*.parquet"
    common = ("data.shuffle_buffer=4", "train.eval_steps=3")
    train(_cfg(tiny, glob, *common, "train.max_steps=12", f"train.output_dir={tmp_path / 'straight'}"))
    straight, seen[:] = list(seen), []
    train(_cfg(tiny, glob, *common, "train.max_steps=3", f"train.output_dir={tmp_path / 'cut'}"))
    assert seen == straight[:3]
    seen.clear()
    summary = train(_cfg(tiny, glob, *common, "train.max_steps=12", f"train.output_dir={tmp_path / 'cut'}", "train.resume=true"))
    assert summary["resumed_from_step"] == 3 and summary["global_step"] == 12
    assert seen == straight[3:]  # steps 4..12, the second pass (reshuffled) included
