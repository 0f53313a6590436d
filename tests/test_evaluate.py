"""loratune evaluate (ASR): base + adapter in one run on a few real HSK clips with the tiny Whisper."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_lora_adapter, make_tiny_whisper

from loratune.asr.evaluate import evaluate
from loratune.config import load_config
from loratune.errors import ConfigError, DataError, ModelError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = make_tiny_whisper(root / "whisper")
    return base, make_tiny_lora_adapter(base, root / "adapter", steps=0)


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory, hsk_dir) -> Path:
    """6 dev rows + 2 train rows of the real HSK table (train rows must never be scored)."""
    rows = list(csv.DictReader(open(hsk_dir / "metadata.csv", encoding="utf-8-sig")))
    pick = [r for r in rows if r["split"] == "dev"][:6] + [r for r in rows if r["split"] == "train"][:2]
    path = tmp_path_factory.mktemp("data") / "metadata.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["ID", "sentence", "split"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("ID", "sentence", "split")} for r in pick)
    return path


def _cfg(base, csv_path, hsk_dir, out, *extra):
    return load_config(None, [
        f"model.name={base}", f"data.csv={csv_path}", f"data.audio_dir={hsk_dir / 'audio'}", "data.eval_split=dev",
        f"eval.output_dir={out}", "eval.batch_size=4", "whisper.generation_max_length=8", *extra,
    ])


def test_base_and_adapter_in_one_run(models, small_csv, hsk_dir, tmp_path, capsys):
    base, adapter = models
    dev_ids = [r["ID"] for r in csv.DictReader(open(small_csv, encoding="utf-8")) if r["split"] == "dev"]
    report = evaluate(_cfg(base, small_csv, hsk_dir, tmp_path, f"model.adapter={adapter}"))
    assert report["metric"] == "cer" and set(report["results"]) == {"base", "adapter"}
    for name in ("base", "adapter"):
        r = report["results"][name]
        assert r["clips"] == 6 and r["ref_units"] > 20 and r["errors"] > 0 and r["cer"] == pytest.approx(r["errors"] / r["ref_units"], abs=1e-5)
        rows = list(csv.DictReader(open(tmp_path / f"predictions_{name}.csv", encoding="utf-8")))
        assert sorted(row["ID"] for row in rows) == sorted(dev_ids)  # all dev rows, no train row
        rates = [float(row["rate"]) for row in rows]
        assert rates == sorted(rates, reverse=True)  # worst first
        assert {"reference", "hypothesis", "reference_norm", "hypothesis_norm", "substitutions", "deletions", "insertions", "errors"} <= set(rows[0])
        # the normalised reference has no punctuation left
        assert all("，" not in row["reference_norm"] and "。" not in row["reference_norm"] for row in rows)
    # the random adapter changes the model, so the two runs really are different models
    base_h = {r["ID"]: r["hypothesis"] for r in csv.DictReader(open(tmp_path / "predictions_base.csv", encoding="utf-8"))}
    ad_h = {r["ID"]: r["hypothesis"] for r in csv.DictReader(open(tmp_path / "predictions_adapter.csv", encoding="utf-8"))}
    assert base_h != ad_h
    saved = json.loads((tmp_path / "metrics.json").read_text(encoding="utf-8"))
    assert saved["results"] == report["results"]
    out = capsys.readouterr().out
    assert "CER" in out and "adapter" in out and "base" in out


def test_limit_is_a_seeded_shuffle(models, small_csv, hsk_dir, tmp_path):
    base, adapter = models
    ids = []
    for run, seed in ((1, 3), (2, 3), (3, 4)):
        # run 2: the adapter alone, in short-clip mode (encoder fed the batch's real length)
        extra = [f"model.adapter={adapter}", "eval.compare_base=false", "whisper.trim_audio=true"] if run == 2 else []
        report = evaluate(_cfg(base, small_csv, hsk_dir, tmp_path / str(run), "eval.limit=3", f"eval.shuffle_seed={seed}", "whisper.metric=wer", *extra))
        name = "adapter" if run == 2 else "base"
        assert list(report["results"]) == [name]
        rows = list(csv.DictReader(open(tmp_path / str(run) / f"predictions_{name}.csv", encoding="utf-8")))
        ids.append(sorted(r["ID"] for r in rows))
        assert json.loads((tmp_path / str(run) / "metrics.json").read_text())["metric"] == "wer"
    assert len(ids[0]) == 3 and ids[0] == ids[1]
    assert ids[0] != ids[2]  # 20 possible subsets; seeds 3 and 4 pick different ones


def test_bad_inputs_fail_before_the_model_loads(models, small_csv, hsk_dir, tmp_path):
    base, adapter = models
    with pytest.raises(ConfigError, match="not a language Whisper knows"):
        evaluate(_cfg(base, small_csv, hsk_dir, tmp_path, "whisper.language=xx"))
    with pytest.raises(ModelError, match="adapter_config.json"):
        evaluate(_cfg(base, small_csv, hsk_dir, tmp_path, f"model.adapter={tmp_path}"))
    with pytest.raises(DataError, match="no evaluation rows"):
        evaluate(_cfg(base, small_csv, hsk_dir, tmp_path, "data.eval_split=test"))


def test_language_by_name_and_unknown_to_checkpoint(models):
    from loratune.core.loading import check_language

    assert check_language("Chinese") == "zh" and check_language("zh") == "zh" and check_language(None) is None
    assert check_language("yue") == "yue"

    class M:  # a checkpoint whose generation config knows only two languages
        class generation_config:
            lang_to_id = {"<|en|>": 1, "<|zh|>": 2}

    with pytest.raises(ConfigError, match="no token"):
        check_language("de", M())


def test_a_test_table_needs_no_train_rows(models, small_csv, hsk_dir, tmp_path):
    """A held-out CSV holds only test rows: evaluate scores them (it stopped with 'no training rows')."""
    base, _ = models
    rows = [r for r in csv.DictReader(open(small_csv, encoding="utf-8")) if r["split"] == "dev"]
    only_dev = tmp_path / "test.csv"
    with open(only_dev, "w", encoding="utf-8", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["ID", "sentence", "split"])
        w.writeheader()
        w.writerows(rows)
    report = evaluate(_cfg(base, only_dev, hsk_dir, tmp_path / "out", "eval.limit=2"))
    assert report["results"]["base"]["clips"] == 2


def test_base_row_is_reused_only_when_nothing_changed(models, small_csv, hsk_dir, tmp_path, monkeypatch):
    """The base's row comes back from the cache without transcribing; any change of decoding, test
    audio or eval.cache_base=false scores it again."""
    import dataclasses

    import loratune.asr.evaluate as E
    from loratune.asr.base_cache import base_row_key

    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))
    base, adapter = models
    extra = (f"model.adapter={adapter}", "eval.forgetting=false", "eval.long_form=false")
    calls, real = [], E.transcribe_all
    monkeypatch.setattr(E, "transcribe_all", lambda t, audios, bs, n, desc: calls.append(desc) or real(t, audios, bs, n, desc))
    first = evaluate(_cfg(base, small_csv, hsk_dir, tmp_path / "a", *extra))
    stored = list((tmp_path / "cache" / "eval-base").glob("*.json"))
    assert calls == ["generate (base)", "generate (adapter)"] and len(stored) == 1 and "cached" not in first["results"]["base"]
    calls.clear()
    second = evaluate(_cfg(base, small_csv, hsk_dir, tmp_path / "b", *extra))
    assert calls == ["generate (adapter)"]  # the base was not transcribed again
    b1, b2 = first["results"]["base"], second["results"]["base"]
    assert b2.pop("cached") == str(stored[0]) and b2 == b1
    assert (tmp_path / "a" / "predictions_base.csv").read_text("utf-8") == (tmp_path / "b" / "predictions_base.csv").read_text("utf-8")
    for changed in ("whisper.no_repeat_ngram_size=3", "eval.cache_base=false"):
        calls.clear()
        third = evaluate(_cfg(base, small_csv, hsk_dir, tmp_path / "c", *extra, changed))
        assert calls == ["generate (base)", "generate (adapter)"] and "cached" not in third["results"]["base"], changed
    # a base-only evaluation stores no general-set WER: an adapter run with the forgetting check scores the base
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache2"))
    evaluate(_cfg(base, small_csv, hsk_dir, tmp_path / "e", "eval.forgetting=true"))
    calls.clear()
    both = evaluate(_cfg(base, small_csv, hsk_dir, tmp_path / "f", f"model.adapter={adapter}", "eval.long_form=false"))
    assert calls[0] == "generate (base)" and "cached" not in both["results"]["base"]
    assert both["results"]["adapter"]["forgetting_wer_increase"] is not None
    # the key follows the decoded audio and the references, not only the file names
    cfg = _cfg(base, small_csv, hsk_dir, tmp_path / "d", *extra)
    test = E.load_test_set(cfg)
    louder = dataclasses.replace(test, audios=[test.audios[0] * 1.01, *test.audios[1:]])
    other_text = dataclasses.replace(test, texts=["别的", *test.texts[1:]])
    keys = {base_row_key(cfg, t) for t in (test, louder, other_text)}
    assert len(keys) == 3 and base_row_key(cfg, test) == base_row_key(cfg, E.load_test_set(cfg))
