"""Streaming SFT (``data.streaming=true``): a tiny Llama trains from parquet shards with a held-out front,
bad rows are counted as they pass (or stop the run naming the row), and the stream equals the
materialised data path example for example. Run: python -m pytest -q tests/test_sft_streaming.py
"""
from __future__ import annotations

import json

import pytest
from sft_tiny import make_tiny_llama, make_tokenizer

from loratune.cli import main
from loratune.config import load_config
from loratune.errors import DataError

PAIRS = [("你好", "Hello."), ("谢谢你！", "Thank you!"), ("对不起。", "Sorry."), ("老师，您好！", "Hello, teacher!"),
         ("没关系。", "It's okay."), ("不客气。", "You're welcome.")]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from datasets import Dataset

    root = tmp_path_factory.mktemp("sft_shards")
    rows = [{"id": f"r{i}", "prompt": p, "completion": c} for i, (p, c) in enumerate(PAIRS * 3)]
    rows[8]["completion"] = ""  # a bad row in the training part (after the 4 held-out rows)
    for k in range(3):
        Dataset.from_list(rows[6 * k: 6 * k + 6]).to_parquet(str(root / f"part-{k}.parquet"))
    return root


def _cfg(shards, *extra):
    return load_config(None, ["task=sft", "data.streaming=true", f"data.parquet={shards}/*.parquet", "data.id_column=id",
                              "train.max_steps=3", "train.eval_strategy=no", "train.report_to=[none]", "train.threads=1",
                              "data.shuffle_buffer=0", *extra])


def test_stream_equals_the_materialised_rows_and_counts_bad_rows(shards):
    from datasets import load_dataset

    from loratune.llm.data import resolve_template, tokenize_rows
    from loratune.llm.stream import build_sft_stream

    tok = make_tokenizer(chat_template=True)
    stream, ev, report = build_sft_stream(_cfg(shards), tok)
    with pytest.raises(DataError, match=r"pass 1 example 8 \(id=r8\): empty 'completion'; fill it or set data.skip_bad_rows=true"):
        list(stream)
    stream, ev, report = build_sft_stream(_cfg(shards, "data.skip_bad_rows=true"), tok)
    streamed = list(stream.take(17))
    assert report["train"]["bad_rows"] == 1 and report["stream"]["rows_read"] >= 18 and ev is None
    # the same examples, in the same order (no shuffle buffer), as the materialised path's tokenize_rows
    cfg = load_config(None, ["task=sft", f"data.parquet={shards}/*.parquet", "data.skip_bad_rows=true"])
    table = load_dataset("parquet", data_files=sorted(map(str, shards.glob("*.parquet"))), split="train")
    whole, counts = tokenize_rows(table, cfg, tok, resolve_template(tok, cfg.sft), "all")
    assert counts["bad_rows"] == 1 and len(whole) == 17
    assert [x["input_ids"] for x in streamed] == whole["input_ids"] and [x["labels"] for x in streamed] == whole["labels"]


def test_a_stream_of_only_bad_rows_stops_instead_of_looping(tmp_path):
    from datasets import Dataset

    from loratune.llm.stream import build_sft_stream

    Dataset.from_list([{"prompt": p, "completion": ""} for p, _ in PAIRS]).to_parquet(str(tmp_path / "bad.parquet"))
    stream, _, _ = build_sft_stream(_cfg(tmp_path, "data.skip_bad_rows=true"), make_tokenizer(chat_template=True))
    with pytest.raises(DataError, match=r"no usable training rows in a whole pass \(6 read, every one bad"):
        next(iter(stream))


def test_tiny_llama_trains_from_a_stream_with_held_out_validation(shards, tmp_path):
    model = make_tiny_llama(tmp_path / "llama")
    out = tmp_path / "run"
    rc = main(["train", "task=sft", f"model.name={model}", "data.streaming=true", f"data.parquet={shards}/*.parquet",
               "data.skip_bad_rows=true", "data.max_eval_samples=4", "train.max_steps=4", "train.batch_size=2",
               "train.eval_strategy=steps", "train.eval_steps=2", "train.report_to=[none]", "train.threads=1",
               f"train.output_dir={out}"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["eval_examples"] == 4 and summary["eval_loss"] > 0
    assert summary["stream"]["rows_used"] >= 8 and (out / "checkpoint-2").is_dir()
