"""The regression gate of loratune evaluate: hallucination signals, forgetting on the general set,
the long-form check, thresholds and exit code 3."""
from __future__ import annotations

import json

import pytest
from test_evaluate import _cfg, models, small_csv  # noqa: F401  (fixtures)

from loratune.asr.gate import check_thresholds, hallucination_signals, has_loop
from loratune.cli import main as cli
from loratune.core.metrics import score


def test_loops_are_found_only_where_the_reference_has_none():
    assert has_loop("他是他是他是他是", "他是白领")
    assert has_loop("请给我一点水请给我一点水请给我一点水", "请给我一点儿水")
    assert not has_loop("哈哈哈哈", "哈哈哈哈")  # the reference laughs too
    assert not has_loop("你好你好", "你好")  # twice is speech, not a loop
    assert has_loop("which which which which", "which one", "wer")
    assert not has_loop("very very good", "very very good", "wer")
    # the reference check works on words too (they were compared coded against plain text)
    assert not has_loop("which which which which", "which which which which", "wer")


def test_signals_on_scored_transcripts():
    refs = ["他是白领。", "请给我一点儿水。", "你好", "南北的差别很大。"]
    hyps = ["他是他是他是他是他是", "请给我一点儿水", "", "南北的差别很大很大很大很大的差别很大"]
    _, items = score(refs, hyps, "cer", "zh")
    s = hallucination_signals(items)
    assert s["loop_rate"] == 0.5 and s["empty_rate"] == 0.25 and s["long_rate"] == 0.5
    inserted = sum(i.counts.insertions for i in items)
    assert inserted > 0 and s["insertion_rate"] == pytest.approx(inserted / sum(i.counts.ref_len for i in items), abs=1e-6)


def test_thresholds_name_the_key_and_value():
    from loratune.config import load_config

    results = {"base": {"cer": 0.11, "loop_rate": 0.2}, "adapter": {"cer": 0.07, "loop_rate": 0.02, "insertion_rate": 0.01}}
    cfg = load_config(None, ["eval.max_loop_rate=0.01", "eval.max_cer=0.1", "eval.max_insertion_rate=0.05"])
    assert check_thresholds(results, cfg.eval) == ["adapter: loop_rate 0.02 > eval.max_loop_rate 0.01"]


def test_evaluate_reports_the_gate_and_exits_3(models, small_csv, hsk_dir, tmp_path, capsys):  # noqa: F811
    base, adapter = models
    args = [f"model.name={base}", f"data.csv={small_csv}", f"data.audio_dir={hsk_dir / 'audio'}", "data.eval_split=dev",
            f"eval.output_dir={tmp_path}", "eval.batch_size=4", "whisper.generation_max_length=8", f"model.adapter={adapter}",
            "eval.long_form=true"]
    assert cli(["evaluate", *args]) == 0  # no thresholds: report only
    report = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("base", "adapter"):
        r = report["results"][name]
        assert {"insertion_rate", "loop_rate", "long_rate", "empty_rate", "general_wer"} <= set(r)
        assert 0 <= r["general_wer"]
    assert "forgetting_wer_increase" in report["results"]["adapter"]
    assert report["gate"]["failures"] == [] and report["gate"]["thresholds"]["max_loop_rate"] is None
    out = capsys.readouterr().out
    assert "loops" in out and "gen.WER" in out
    assert cli(["evaluate", *args, "eval.max_cer=0.0", "eval.long_form=false"]) == 3
    err = capsys.readouterr().err
    assert "gate: adapter: cer" in err and "> eval.max_cer 0" in err
