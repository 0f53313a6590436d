"""LM rescoring on the dev split: Whisper's choice, the oracle, and a grid of lm_weight x length_bonus.

    python benchmarks/rescore_grid.py configs/whisper-base-hsk-qlora.yaml model.adapter=outputs/acc/tempo_default \
        rescore.lm=gemma3-270m --out benchmarks/results/rescore_grid_tempo_default.json

Runs loratune's own path (``make_transcriber`` of the config's ``transcribe.backend``, the n-best list
each backend hands to ``LMRescorer.choose``) once over the dev clips, records every candidate with its
Whisper and LM log-probabilities, and scores each (lm_weight, length_bonus) pair with loratune's CER.
Two-fold cross-validation (choose the pair on the odd clips, score the even ones, and back) says how
much of the best pair's gain is tuning noise. Row "whisper" = the candidate with the best Whisper score
(lm_weight 0, length_bonus 0); "beam top-1" is what beam search alone would output (length-normalised).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

WEIGHTS = [0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
BONUSES = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from loratune.asr.ct2_transcriber import make_transcriber
    from loratune.asr.evaluate import load_test_set, transcribe_all
    from loratune.asr.rescore import LMRescorer, characters
    from loratune.config import load_config
    from loratune.core.metrics import edit_counts, normalize

    cfg = load_config(args.config, args.overrides)
    if not cfg.rescore.lm:
        sys.exit("set rescore.lm (e.g. rescore.lm=gemma3-270m)")
    test = load_test_set(cfg)
    transcriber = make_transcriber(cfg)
    transcriber.batch_size = cfg.eval.batch_size
    if hasattr(transcriber, "trim_audio"):
        transcriber.trim_audio = cfg.whisper.trim_audio and bool(cfg.model.adapter)
    rescorer: LMRescorer = transcriber.rescorer
    seen = []  # every n-best list, in the order the transcriber asked
    lm = {}  # text -> the LM log-probability the rescorer itself computed (one LM pass, the scores it chose by)
    choose, log_probs = rescorer.choose, rescorer.log_probs

    def recording_choose(nbests):
        seen.extend(nbests)
        return choose(nbests)

    def recording_log_probs(texts):
        scores = log_probs(texts)
        lm.update(zip(texts, scores))
        return scores

    rescorer.choose, rescorer.log_probs = recording_choose, recording_log_probs
    start = time.time()
    transcribe_all(transcriber, test.audios, cfg.eval.batch_size, cfg.whisper.generation_max_length, "n-best")
    seconds = time.time() - start
    # transcribe_all decodes the clips sorted by length (a stable sort), one batch after another
    order = sorted(range(len(test.audios)), key=lambda i: len(test.audios[i]))
    records = dict(zip(order, seen))
    ref_norm = [normalize(r, cfg.whisper.language) for r in test.texts]
    n_chars = sum(len("".join(r.split())) for r in ref_norm)
    clips = []
    for i in range(len(test.ids)):
        cands = [(t, s) for t, s in records[i] if t] or records[i][:1]
        clips.append([(s, lm.get(t, 0.0), characters(t), edit_counts(ref_norm[i], normalize(t, cfg.whisper.language), "cer").errors)
                      for t, s in cands])

    def cer(subset, w, b):
        errors = sum(max(c, key=lambda x: x[0] + w * x[1] + b * x[2])[3] for c in (clips[i] for i in subset) if c)
        return errors / sum(len("".join(ref_norm[i].split())) for i in subset)

    everything = list(range(len(clips)))
    grid = {f"{w}/{b}": round(cer(everything, w, b), 5) for w in WEIGHTS for b in BONUSES}
    folds = [everything[0::2], everything[1::2]]
    cv_errors = 0.0
    picks = []
    for k in range(2):
        w, b = min(((w, b) for w in WEIGHTS for b in BONUSES), key=lambda p: cer(folds[k], *p))
        held = cer(folds[1 - k], w, b)
        picks.append({"chosen_on": "odd" if k else "even", "lm_weight": w, "length_bonus": b, "held_out_cer": round(held, 5)})
        cv_errors += held * sum(len("".join(ref_norm[i].split())) for i in folds[1 - k])
    report = {
        "command": "python benchmarks/rescore_grid.py " + " ".join([args.config, *args.overrides, "--out", args.out]),
        "clips": len(clips), "characters": n_chars, "backend": type(transcriber).__name__, "hypotheses": rescorer.hypotheses,
        "n_best_seconds": round(seconds, 1),
        "whisper_best_score_cer": round(cer(everything, 0.0, 0.0), 5),
        "oracle_cer": round(sum(min(x[3] for x in c) for c in clips if c) / n_chars, 5),
        "configured": {"lm_weight": rescorer.lm_weight, "length_bonus": rescorer.length_bonus,
                       "cer": round(cer(everything, rescorer.lm_weight, rescorer.length_bonus), 5)},
        "two_fold_cv_cer": round(cv_errors / n_chars, 5), "folds": picks,
        "grid_lm_weight/length_bonus": grid,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "grid_lm_weight/length_bonus"}, indent=1, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
