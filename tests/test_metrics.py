"""Normalisation, CER/WER and the Seq2SeqTrainer compute_metrics callback."""
from __future__ import annotations

import numpy as np
import pytest

from loratune.core import metrics
from loratune.core.metrics import cer, edit_counts, metric_for, normalize, score, wer


def test_traditional_to_simplified_and_punctuation_removed():
    assert normalize("你們好，世界！") == "你们好 世界"
    assert normalize("我喜歡學習中文。") == "我喜欢学习中文"
    # full-width letters/digits fold to ASCII, symbols and quotes vanish, case folds
    assert normalize("ＨＳＫ　３級「考試」😀") == "hsk 3级 考试"
    assert normalize("  a\t\n b  ") == "a b"
    assert normalize(None) == ""


def test_english_uses_whisper_normaliser_with_spelling_map():
    # the British->American map only exists in the vendored OpenAI file: this fails without it
    assert normalize("The Colour of the Centre!", "en") == "the color of the center"
    assert normalize("I won't go, um, there.", "en") == "i will not go there"
    assert normalize("Mr. Smith has 2 dollars", "en") == normalize("mister smith has $2", "en")


def test_cer_ignores_spaces_and_punctuation():
    assert cer(["我 爱 北京。"], ["我爱北京"]) == 0.0
    assert cer(["我爱北京"], ["我爱南京"]) == pytest.approx(0.25)
    assert cer(["我愛北京"], ["我爱北京"]) == 0.0  # traditional hypothesis is not an error


def test_corpus_rate_is_total_edits_over_total_reference_units():
    # 1 error in 4 chars + 2 errors in 2 chars = 3/6, not the mean of 0.25 and 1.0
    rate, items = score(["我爱北京", "你好"], ["我爱南京", ""], "cer", "zh")
    assert rate == pytest.approx(0.5)
    assert [s.counts.errors for s in items] == [1, 2]
    assert items[1].counts.deletions == 2


def test_edit_counts_substitution_deletion_insertion():
    c = edit_counts("abcd", "abxde", "cer")
    assert (c.substitutions, c.deletions, c.insertions, c.hits) == (1, 0, 1, 3)
    c = edit_counts("the cat sat", "the sat", "wer")
    assert (c.deletions, c.hits, c.errors, c.ref_len) == (1, 2, 1, 3)
    assert edit_counts("", "", "cer").errors == 0
    assert edit_counts("", "ab", "cer").rate == 2.0


def test_wer_english():
    assert wer(["Hello, world!"], ["hello world"]) == 0.0
    assert wer(["the cat sat on the mat"], ["the cat sat on a mat"]) == pytest.approx(1 / 6)


def test_metric_for_language():
    assert metric_for("zh") == "cer" and metric_for("ja") == "cer" and metric_for("yue") == "cer"
    assert metric_for("en") == "wer" and metric_for("de") == "wer" and metric_for(None) == "wer"
    assert metric_for("zh", "wer") == "wer"
    assert metric_for("Chinese") == "cer" and metric_for("<|ja|>") == "cer" and metric_for("english") == "wer"
    with pytest.raises(ValueError):
        metric_for("zh", "bleu")


def test_compute_metrics_replaces_minus_100_and_decodes():
    from tiny import whisper_tokenizer
    from transformers import EvalPrediction

    tok = whisper_tokenizer()

    class Proc:  # the callback only needs processor.tokenizer
        tokenizer = tok

    ref = tok("我爱北京", add_special_tokens=False).input_ids
    hyp = tok("我爱南京", add_special_tokens=False).input_ids
    n = max(len(ref), len(hyp)) + 2
    labels = np.full((2, n), -100)
    labels[0, : len(ref)] = ref
    labels[1, : len(ref)] = ref
    preds = np.full((2, n), -100)  # the trainer pads predictions of different batches with -100
    preds[0, : len(ref)] = ref
    preds[1, : len(hyp)] = hyp
    fn = metrics.build_compute_metrics(Proc(), "cer")
    out = fn(EvalPrediction(predictions=(preds,), label_ids=labels))
    assert out == {"cer": pytest.approx(1 / 8)}
    out = metrics.build_compute_metrics(Proc(), "auto", language="en")(EvalPrediction(predictions=preds, label_ids=labels))
    assert set(out) == {"wer"}
    tok.set_prefix_tokens(language="chinese")  # auto + no language: the tokenizer's prompt language decides
    assert set(metrics.build_compute_metrics(Proc(), "auto")(EvalPrediction(predictions=preds, label_ids=labels))) == {"cer"}
