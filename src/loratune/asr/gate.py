"""The regression gate of ``loratune evaluate``: what fine-tuning breaks, beside the error rate.

    signals = hallucination_signals(items)       # items: core.metrics.Scored of one model
    failures = check_thresholds(results, cfg.eval)   # ["adapter: loop_rate 0.031 > eval.max_loop_rate 0.01", ...]

Hallucination signals, per model, from the scored transcripts (units: characters for CER, words for
WER, after normalisation):

- ``insertion_rate``: inserted units / reference units (what a model says that was never said);
- ``loop_rate``: share of outputs holding a repetition loop the reference does not have (a unit
  sequence of 1-10 units repeated back to back: 4+ times for one unit, 3+ times for longer ones);
- ``long_rate``: share of outputs over twice the reference's length;
- ``empty_rate``: share of empty outputs for a non-empty reference.

Thresholds are options (``eval.max_*``, null = report only); ``loratune evaluate`` exits with code 3
and one line per crossed threshold, so CI can gate on it.
"""
from __future__ import annotations

import re
from typing import Dict, List, Sequence

from loratune.core.metrics import units

# a unit run repeated back to back: (x){4,} for single units, (xy...){3,} for longer ones
_LOOP_1 = re.compile(r"(.)\1{3,}")
_LOOP_N = re.compile(r"(.{2,10}?)\1{2,}")
THRESHOLDS = ("cer", "wer", "insertion_rate", "loop_rate", "long_rate", "empty_rate", "forgetting_wer_increase",
              "long_form_cer_gap")


def _coded(units: Sequence[str], table: Dict[str, str]) -> str:
    """One character per unit (words become private-use code points, shared through ``table``),
    so regexes see unit runs and a loop can be looked up in the equally coded reference."""
    return "".join(table.setdefault(u, chr(0xE000 + len(table))) if len(u) != 1 else u for u in units)


def has_loop(hyp_norm: str, ref_norm: str, metric: str = "cer") -> bool:
    """A repetition loop in the hypothesis that the reference does not contain."""
    table: Dict[str, str] = {}
    hyp = _coded(units(hyp_norm, metric), table)
    ref = _coded(units(ref_norm, metric), table)
    return any(m.group(0) not in ref for rx in (_LOOP_1, _LOOP_N) for m in rx.finditer(hyp))


def hallucination_signals(items, metric: str = "cer") -> Dict[str, float]:
    """The four signals of one model's scored transcripts (see the module docstring)."""
    n = max(len(items), 1)
    ref_units = sum(s.counts.ref_len for s in items)
    loops = sum(has_loop(s.hypothesis_norm, s.reference_norm, metric) for s in items)
    long = sum(1 for s in items if s.counts.ref_len and len(units(s.hypothesis_norm, metric)) > 2 * s.counts.ref_len)
    empty = sum(1 for s in items if s.counts.ref_len and not units(s.hypothesis_norm, metric))
    return {
        "insertion_rate": round(sum(s.counts.insertions for s in items) / max(ref_units, 1), 6),
        "loop_rate": round(loops / n, 6),
        "long_rate": round(long / n, 6),
        "empty_rate": round(empty / n, 6),
    }


def check_thresholds(results: Dict[str, Dict], eval_cfg, models: Sequence[str] = ("adapter",)) -> List[str]:
    """One line per crossed ``eval.max_*`` threshold, for the models named (the adapter by default;
    the base too when it is the only model scored)."""
    failures = []
    scored = [m for m in models if m in results] or list(results)
    for model in scored:
        for key in THRESHOLDS:
            limit = getattr(eval_cfg, f"max_{key}", None)
            value = results[model].get(key)
            if limit is not None and value is not None and value > limit:
                failures.append(f"{model}: {key} {value:.4g} > eval.max_{key} {limit:g}")
    return failures
