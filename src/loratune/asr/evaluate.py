"""Whisper evaluation: generation CER/WER of a base model, an adapter, or both in one run.

    loratune evaluate configs/whisper-base-hsk-qlora.yaml model.adapter=outputs/whisper-base-hsk-qlora
    loratune evaluate configs/whisper-base-hsk-qlora.yaml eval.limit=100 eval.compare_base=false

The test set is the recipe's evaluation split, read by the training data loader
(:func:`loratune.asr.features.load_raw_splits`: same CSV/Hub/disk sources and split rules; the
training-only ``data.max_eval_samples`` cap is ignored, ``eval.limit`` takes N rows after a shuffle
seeded by ``eval.shuffle_seed``). With ``model.adapter`` and ``eval.compare_base=true`` the base is
scored too, by switching the adapter off (``PeftModel.disable_adapter``) on the one loaded model.
``whisper.trim_audio`` (short-clip mode) applies to the adapter only: the base is scored on
Whisper's native 30-s input, and its row is reused from the cache when nothing that decides it changed
(:mod:`loratune.asr.base_cache`, ``eval.cache_base``). Metric: ``whisper.metric`` (``auto`` = CER for zh/ja/ko/th/yue, WER otherwise) on normalised text
(:func:`loratune.core.metrics.normalize`). Outputs in ``eval.output_dir`` (default ``<adapter>/eval``
or ``<train.output_dir>/eval``): ``metrics.json`` and ``predictions_<model>.csv`` (ID, reference,
hypothesis, normalised forms, edit counts), worst utterance first; a table on screen.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import random
import time
from pathlib import Path
from typing import Dict, List

import numpy as np

from loratune.asr.gate import THRESHOLDS, check_thresholds, hallucination_signals
from loratune.core.atomic import write_json, write_text
from loratune.core.metrics import metric_for, score
from loratune.core.model_card import add_evaluation
from loratune.errors import DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TestSet:
    ids: List[str]
    texts: List[str]
    audios: List[np.ndarray]
    source: str


def load_test_set(cfg) -> TestSet:
    """Evaluation rows of ``cfg.data`` (limit + seeded shuffle applied), audio decoded at 16 kHz."""
    from tqdm.auto import tqdm

    from loratune.asr.features import AUDIO, REF, TEXT, _decode, load_raw_splits

    data = dataclasses.replace(cfg.data, max_eval_samples=None, max_train_samples=None)
    _, ev = load_raw_splits(data, need_train=False)  # a test CSV needs no train rows
    if ev is None or len(ev) == 0:
        raise DataError("no evaluation rows: set data.eval_split (e.g. dev / test) or a split column with such rows")
    order = list(range(len(ev)))
    if cfg.eval.limit:
        random.Random(cfg.eval.shuffle_seed).shuffle(order)
        order = sorted(order[: cfg.eval.limit])
    ev = ev.select(order)
    ids, texts, audios = [], [], []
    for row in tqdm(ev, desc="decode audio", unit="clip"):
        cell = row[AUDIO]
        path = cell if isinstance(cell, str) else (cell or {}).get("path")
        ids.append(Path(path).name if path else row[REF])
        texts.append(row[TEXT])
        audios.append(_decode(cell))
    source = data.csv or data.hub or data.disk or "?"
    return TestSet(ids, texts, audios, f"{source} [{data.eval_split or 'held-out ' + str(data.eval_ratio)}]")


def transcribe_all(transcriber, audios: List[np.ndarray], batch_size: int, max_new_tokens: int, desc: str) -> List[str]:
    """Texts for ``audios`` in input order; batches are formed by length (less padding)."""
    from tqdm.auto import tqdm

    order = sorted(range(len(audios)), key=lambda i: len(audios[i]))
    texts: List[str] = [""] * len(audios)
    with tqdm(total=len(audios), desc=desc, unit="clip") as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, t in zip(idx, transcriber([audios[i] for i in idx], max_new_tokens=max_new_tokens)):
                texts[i] = t.text
            bar.update(len(idx))
    return texts


def write_predictions(path: Path, ids: List[str], items) -> None:
    """Per-utterance CSV, worst first (highest error rate, then most errors)."""
    rows = [{"ID": i, **s.row()} for i, s in zip(ids, items)]
    rows.sort(key=lambda r: (-r["rate"], -r["errors"], r["ID"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def default_output_dir(cfg) -> Path:
    if cfg.eval.output_dir:
        return Path(cfg.eval.output_dir)
    return Path(cfg.model.adapter or cfg.train.output_dir) / "eval"


def general_set_wer(transcriber, batch_size: int) -> float:
    """WER on the shipped general set (resources/general: English sentences), each clip in its own
    language and on Whisper's native 30-s input, so base and adapter see the same thing."""
    from importlib import resources

    from loratune.core.audio import load_audio

    root = resources.files("loratune").joinpath("resources/general")
    rows = list(csv.DictReader(io.StringIO(root.joinpath("manifest.csv").read_text("utf-8"))))
    saved = transcriber.language, transcriber.trim_audio
    hyps, refs = [], []
    try:
        transcriber.trim_audio = False
        for language in sorted({r["language"] for r in rows}):
            group = [r for r in rows if r["language"] == language]
            transcriber.language = language
            audios = [load_audio(str(root.joinpath(r["file"]))) for r in group]
            hyps += transcribe_all(transcriber, audios, batch_size, 64, f"general set ({language})")
            refs += [r["text"] for r in group]
    finally:
        transcriber.language, transcriber.trim_audio = saved
    return round(score(refs, hyps, "wer", "en")[0], 6)


def long_form_check(transcriber, test, hyps: List[str], metric: str, language, minutes: float = 2.0) -> Dict:
    """Join test clips (0.5 s of silence between) into files of about ``minutes``, transcribe them
    through the long-form path (``transcribe.long_form``, as ``loratune transcribe`` would), and
    compare with the clip-by-clip ``hyps`` of the same clips: CER gap and timestamp order."""
    from loratune.asr.longform import join_texts
    from loratune.core.audio import SAMPLE_RATE

    gap = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    files, refs, clip_hyps, current, text, hyp = [], [], [], [], [], []
    for audio, ref, h in zip(test.audios, test.texts, hyps):
        current += [audio, gap]
        text.append(ref)
        hyp.append(h)
        if sum(len(a) for a in current) >= minutes * 60 * SAMPLE_RATE:
            files.append(np.concatenate(current))
            refs.append(join_texts(text, language))
            clip_hyps.append(join_texts(hyp, language))
            current, text, hyp = [], [], []
            if len(files) == 2:
                break
    if not files:  # fewer clips than one file: use what there is if it is long form at all
        joined = np.concatenate(current) if current else np.zeros(0, np.float32)
        if len(joined) <= 30 * SAMPLE_RATE:
            return {"long_form_files": 0}
        files, refs, clip_hyps = [joined], [join_texts(text, language)], [join_texts(hyp, language)]
    outs = [transcriber([f])[0] for f in files]  # the long-form path transcribe uses (transcribe.long_form)
    rate = score(refs, [o.text for o in outs], metric, language)[0]
    # the same clips one by one, joined
    clip_rate = score(refs, clip_hyps, metric, language)[0]
    increasing = all(all(a.start <= b.start and a.start <= a.end for a, b in zip(o.segments, o.segments[1:])) and o.segments
                     for o in outs)
    return {"long_form_files": len(files), "long_form_seconds": round(sum(len(f) for f in files) / SAMPLE_RATE, 1),
            f"long_form_{metric}": round(rate, 6), f"long_form_clip_{metric}": round(clip_rate, 6),
            "long_form_cer_gap": round(rate - clip_rate, 6), "long_form_timestamps_ok": bool(increasing),
            "long_form_mode": getattr(transcriber, "long_form", "sequential")}


def print_table(metric: str, results: Dict[str, Dict], examples: List[Dict]) -> None:
    print(f"\n{'model':<9} {metric.upper():>7} {'errors':>8} {'units':>7} {'clips':>6} {'seconds':>8} {'clips/s':>8}"
          f" {'ins':>6} {'loops':>6} {'long':>6} {'empty':>6} {'gen.WER':>8}")
    for name, r in results.items():
        general = f"{r['general_wer']:>8.4f}" if r.get("general_wer") is not None else f"{'-':>8}"
        print(f"{name:<9} {r[metric]:>7.4f} {r['errors']:>8} {r['ref_units']:>7} {r['clips']:>6} {r['seconds']:>8.1f} {r['clips_per_second']:>8.2f}"
              f" {r['insertion_rate']:>6.3f} {r['loop_rate']:>6.3f} {r['long_rate']:>6.3f} {r['empty_rate']:>6.3f} {general}")
    for name, r in results.items():
        if r.get("cached"):
            print(f"{name}: row reused from {r['cached']} (same base, test set and decoding; eval.cache_base=false scores it again)")
    if "base" in results and "adapter" in results and results["base"][metric] > 0:
        drop = 1 - results["adapter"][metric] / results["base"][metric]
        print(f"relative {metric.upper()} change, adapter vs base: {-drop:+.1%}")
    for ex in examples:
        print("\n" + "\n".join(f"  {k:<9} {v}" for k, v in ex.items()))


def evaluate(cfg) -> Dict:
    """Score the configured model(s); writes metrics.json + predictions CSVs; returns the metrics."""
    import torch

    from loratune.asr.transcriber import Transcriber
    from loratune.core.loading import check_adapter, check_language, load_asr

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    language = check_language(cfg.whisper.language)
    metric = metric_for(language, cfg.whisper.metric)
    if cfg.model.adapter:
        check_adapter(cfg.model.adapter)
    out_dir = default_output_dir(cfg)
    test = load_test_set(cfg)  # data errors surface before the model loads
    log.info("test set: %d clips from %s", len(test.ids), test.source)
    runs = []  # (name, context that switches the adapter off or leaves the model as it is, transcriber)
    from loratune.asr.base_cache import base_row_key, load_base_row, save_base_row
    from loratune.asr.rescore import LMRescorer

    scores_base = not cfg.model.adapter or cfg.eval.compare_base  # no base row, no key to compute
    base_key = base_row_key(cfg, test) if cfg.eval.cache_base and scores_base else None
    # the base never changes: its row is reused (with its general-set WER when the gate needs it)
    cached = load_base_row(base_key, len(test.ids), needs_general=bool(cfg.model.adapter and cfg.eval.forgetting))
    if cached and not cfg.model.adapter:
        cached = None  # scoring the base alone is what was asked: score it

    rescorer = LMRescorer.from_config(cfg)  # one LM for both models: the same decoding before and after
    if cfg.eval.backend == "ctranslate2":  # the deployment path: one cached CT2 copy per model
        from loratune.asr.ct2_transcriber import CT2Transcriber

        if cfg.model.adapter and cfg.eval.compare_base:  # a cached base row needs no base model
            runs.append(("base", contextlib.nullcontext, None if cached else CT2Transcriber.from_config(cfg, adapter=None, rescorer=rescorer)))
        runs.append(("adapter" if cfg.model.adapter else "base", contextlib.nullcontext, CT2Transcriber.from_config(cfg, rescorer=rescorer)))
        for _, _, t in runs:
            if t is not None:
                t.batch_size = cfg.eval.batch_size
    else:
        from loratune.asr.longform import resolve_long_form

        model, processor = load_asr(cfg)
        w, t = cfg.whisper, cfg.transcribe
        transcriber = Transcriber(model, processor, language, w.task, w.num_beams, timestamps=False, trim_audio=w.trim_audio,
                                  no_repeat_ngram_size=w.no_repeat_ngram_size, max_tokens_per_second=w.max_tokens_per_second,
                                  long_form=resolve_long_form(t.long_form, w.trim_audio), chunk_seconds=t.chunk_seconds,
                                  batch_size=cfg.eval.batch_size, merge_seconds=t.merge_seconds, rescorer=rescorer)
        if cfg.model.adapter and cfg.eval.compare_base:
            runs.append(("base", model.disable_adapter, transcriber))
        runs.append(("adapter" if cfg.model.adapter else "base", contextlib.nullcontext, transcriber))
    results, details = {}, {}
    for name, context, transcriber in runs:
        # The untuned base always sees Whisper's native 30-s padded input: fed trimmed input it
        # falls into repetition loops (measured on whisper-base/HSK), which would inflate "before".
        from_cache = cached if name == "base" else None
        if transcriber is not None:
            transcriber.trim_audio = cfg.whisper.trim_audio and name == "adapter"
        with context():
            start = time.perf_counter()
            if from_cache:
                hyps, seconds = from_cache["hyps"], from_cache["seconds"]
            else:
                hyps = transcribe_all(transcriber, test.audios, cfg.eval.batch_size, cfg.whisper.generation_max_length, f"generate ({name})")
                seconds = time.perf_counter() - start
            rate, items = score(test.texts, hyps, metric, language)
            details[name] = items
            results[name] = {
                metric: round(rate, 6),
                "errors": sum(s.counts.errors for s in items),
                "ref_units": sum(s.counts.ref_len for s in items),
                "clips": len(items),
                "seconds": round(seconds, 2),
                "clips_per_second": round(len(items) / max(seconds, 1e-9), 3),
                **hallucination_signals(items, metric),
            }
            if cfg.model.adapter and cfg.eval.forgetting:
                results[name]["general_wer"] = (from_cache["general_wer"] if from_cache
                                                else general_set_wer(transcriber, cfg.eval.batch_size))
            if from_cache:  # seconds: those of the run that scored it
                results[name]["cached"] = from_cache["path"]
            elif name == "base":
                save_base_row(base_key, hyps, results[name].get("general_wer"), seconds)
            if cfg.model.adapter and cfg.eval.long_form and name == "adapter":
                results[name].update(long_form_check(transcriber, test, hyps, metric, language))
        write_predictions(out_dir / f"predictions_{name}.csv", test.ids, items)
    report = {
        "metric": metric,
        "language": language,
        "normalisation": "loratune.core.metrics.normalize (NFKC, zh-cn, lower case, punctuation/symbols/space removed; Whisper EnglishTextNormalizer for en)",
        "test_set": test.source,
        "limit": cfg.eval.limit,
        "shuffle_seed": cfg.eval.shuffle_seed,
        "model": cfg.model.name,
        "adapter": cfg.model.adapter,
        "quant_bits": cfg.quant.bits,
        "backend": cfg.eval.backend,
        "num_beams": cfg.whisper.num_beams if rescorer is None else cfg.rescore.hypotheses,
        "rescore": dataclasses.asdict(cfg.rescore) if rescorer is not None else None,  # the n-best LM, when on
        "results": results,
    }
    if "general_wer" in results.get("base", {}) and "general_wer" in results.get("adapter", {}):
        results["adapter"]["forgetting_wer_increase"] = round(results["adapter"]["general_wer"] - results["base"]["general_wer"], 6)
    failures = check_thresholds(results, cfg.eval, ("adapter",) if cfg.model.adapter else ("base",))
    report["gate"] = {"thresholds": {f"max_{k}": getattr(cfg.eval, f"max_{k}") for k in THRESHOLDS},
                      "failures": failures}
    write_json(out_dir / "metrics.json", report)
    if cfg.model.adapter:  # the adapter's model card gets the scores (before/after when compared)
        rows = [f"| {metric.upper()} on `{test.source}` ({len(test.ids)} clips) | "
                + ", ".join(f"{n}: {r[metric]:.4f}" for n, r in results.items()) + " |"]
        add_evaluation(cfg.model.adapter, ["| evaluation | result |", "|---|---|", *rows])
    # a few of the worst utterances of the last model, with every model's hypothesis
    last = runs[-1][0]
    worst = sorted(range(len(test.ids)), key=lambda i: -details[last][i].counts.rate)[:3]
    examples = [{"ID": test.ids[i], "reference": test.texts[i], **{n: details[n][i].hypothesis for n in details}} for i in worst]
    print_table(metric, results, examples)
    print(f"\nwrote {out_dir / 'metrics.json'} and predictions_*.csv")
    return report
