"""n-best rescoring with a causal LM (asr/rescore.py) on both transcription backends.

Tiny random Whisper and tiny random Llama: the mechanics (LM scores independent of batching, the
score rule, the n-best lists both backends hand over). The accuracy rows are in benchmarks/ACCURACY.md.
"""
from __future__ import annotations

import csv
import logging

import pytest
import torch
from sft_tiny import make_tiny_llama
from tiny import make_tiny_lora_adapter, make_tiny_whisper

from loratune.asr.rescore import LMRescorer, characters
from loratune.config import load_config
from loratune.core.audio import load_audio
from loratune.errors import ConfigError

torch.set_num_threads(1)
TEXTS = ["老师，您好！", "谢谢你", "The force is strong with you.", "对不起。没关系。", "Hello", "不客气"]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("lm") / "llama", chat_template=False)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    root = tmp_path_factory.mktemp("rescore")
    base = make_tiny_whisper(root / "whisper")
    return base, make_tiny_lora_adapter(base, root / "adapter", steps=0)


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path_factory.getbasetemp() / "rescore-cache"))


def _rescorer(lm_dir, *extra) -> LMRescorer:
    return LMRescorer.from_config(load_config(None, [f"rescore.lm={lm_dir}", "rescore.dtype=float32", *extra]))


def test_lm_scores_are_the_models_own_and_do_not_depend_on_batching(lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batched = _rescorer(lm_dir).log_probs(TEXTS)
    alone = _rescorer(lm_dir, "rescore.batch_size=1").log_probs(TEXTS)
    assert batched == pytest.approx(alone, abs=1e-4)
    tok = AutoTokenizer.from_pretrained(lm_dir)
    model = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32).eval()
    for text, got in zip(TEXTS, batched):
        ids = torch.tensor([[tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids])
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
        assert got == pytest.approx(float(logp.gather(-1, ids[0, 1:, None]).sum()), abs=1e-4)
        assert got < 0
    assert LMRescorer.from_config(load_config(None, [])) is None  # off unless rescore.lm is set


def test_score_rule_weights_length_bonus_duplicates_and_empty_candidates(lm_dir):
    texts = TEXTS[:4]
    whisper = [-1.0, -2.0, -3.0, -4.0]
    lm = dict(zip(texts, _rescorer(lm_dir).log_probs(texts)))
    nbest = list(zip(texts, whisper))
    assert _rescorer(lm_dir, "rescore.lm_weight=0", "rescore.length_bonus=0").choose([nbest]) == [texts[0]]
    assert _rescorer(lm_dir, "rescore.lm_weight=1000", "rescore.length_bonus=0").choose([nbest]) == [max(texts, key=lm.get)]
    assert _rescorer(lm_dir, "rescore.lm_weight=0", "rescore.length_bonus=100").choose([nbest]) == [max(texts, key=characters)]
    # the rule itself, with the defaults
    r = _rescorer(lm_dir)
    total = {t: w + r.lm_weight * lm[t] + r.length_bonus * characters(t) for t, w in nbest}
    assert r.choose([nbest]) == [max(total, key=total.get)]
    # a text reached by two token paths keeps its better Whisper score
    twice = [(texts[1], -9.0), (texts[0], -1.0), (texts[1], -0.5)]
    assert _rescorer(lm_dir, "rescore.lm_weight=0", "rescore.length_bonus=0").choose([twice]) == [texts[1]]
    # an empty candidate never wins against text (the LM would score it 0 for free); alone it stays
    assert r.choose([[("", 0.0), (texts[2], -50.0)], [("", -1.0)], []]) == [texts[2], "", ""]
    # nor does a candidate cut inside a multi-byte character (seen on HSK dev: 别吵了，孩子在睡觉 -> "别\ufffd")
    cut = texts[2][:1] + "\ufffd"
    assert r.choose([[(cut, 0.0), (texts[2], -50.0)], [(cut, -1.0)]]) == [texts[2], cut]


def test_bad_rescore_options_are_one_line(lm_dir, tmp_path):
    for key, fix in [("rescore.hypotheses=1", "at least 2"), ("rescore.lm_weight=-1", "0 or more"), ("rescore.dtype=int4", "bfloat16")]:
        with pytest.raises(ConfigError, match=fix):
            load_config(None, [f"rescore.lm={lm_dir}", key])
    with pytest.raises(Exception, match="rescore.lm="):
        LMRescorer.from_config(load_config(None, [f"rescore.lm={tmp_path / 'nothing'}"]))


@pytest.mark.parametrize("backend", ["transformers", "ctranslate2"])
def test_each_backend_hands_over_the_beam_n_best(whisper, lm_dir, hsk_dir, backend, monkeypatch):
    from loratune.asr.ct2_transcriber import make_transcriber

    base, adapter = whisper
    clips = [load_audio(hsk_dir / "audio" / f"hsk1-000{i}.mp3") for i in range(1, 5)]
    common = [f"model.name={base}", f"model.adapter={adapter}", "whisper.language=zh", "whisper.trim_audio=true",
              "transcribe.compute_type=float32", "transcribe.cpu_threads=1", "transcribe.batch_size=4"]
    plain = make_transcriber(load_config(None, [*common, "whisper.num_beams=3"]), backend)
    beam_top = [t.text for t in plain(clips, max_new_tokens=10)]
    seen = []
    monkeypatch.setattr(LMRescorer, "choose", lambda self, nbests: seen.extend(nbests) or [n[0][0] for n in nbests])
    rescoring = make_transcriber(load_config(None, [*common, f"rescore.lm={lm_dir}", "rescore.hypotheses=3"]), backend)
    assert rescoring.rescorer is not None
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        rescoring(clips, max_new_tokens=10)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r.getMessage() for r in records if "attention mask" in r.getMessage() or "seem to have been set" in r.getMessage()]
    assert len(seen) == len(clips) and all(len(n) == 3 for n in seen)
    for n, top in zip(seen, beam_top):
        assert top in [t for t, _ in n]  # the plain beam search's answer is one of the candidates
        assert all(s <= 0 for _, s in n) and len({s for _, s in n}) > 1  # summed log-probabilities, not copies


@pytest.mark.parametrize("backend", ["transformers", "ctranslate2"])
def test_evaluate_rescores_base_and_adapter_with_one_lm(whisper, lm_dir, hsk_dir, tmp_path, backend, monkeypatch):
    from loratune.asr.evaluate import evaluate

    base, adapter = whisper
    loads = []
    original = LMRescorer.from_config.__func__
    monkeypatch.setattr(LMRescorer, "from_config", classmethod(lambda cls, cfg: loads.append(1) or original(cls, cfg)))
    rows = list(csv.DictReader(open(hsk_dir / "metadata.csv", encoding="utf-8-sig")))[:3]
    csv_path = tmp_path / "dev.csv"
    csv_path.write_text("ID,sentence,split\n" + "".join(f"{r['ID']},{r['sentence']},dev\n" for r in rows), encoding="utf-8")
    report = evaluate(load_config(None, [
        f"model.name={base}", f"model.adapter={adapter}", f"data.csv={csv_path}", f"data.audio_dir={hsk_dir / 'audio'}",
        "data.eval_split=dev", f"eval.output_dir={tmp_path / 'eval'}", f"eval.backend={backend}", "eval.forgetting=false",
        "eval.long_form=false", "whisper.generation_max_length=8", "transcribe.compute_type=float32", "transcribe.cpu_threads=1",
        f"rescore.lm={lm_dir}", "rescore.hypotheses=3", "rescore.dtype=float32"]))
    assert len(loads) == 1  # one LM for the base and the adapter
    assert set(report["results"]) == {"base", "adapter"} and all(r["clips"] == 3 for r in report["results"].values())
    assert report["rescore"]["lm"] == str(lm_dir) and report["num_beams"] == 3 and report["backend"] == backend
    assert LMRescorer.from_config(load_config(None, [])) is None
