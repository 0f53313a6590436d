"""Transcript normalisation and error rates (CER / WER) shared by evaluation and training.

Normalisation (:func:`normalize`), applied to references and hypotheses alike before scoring:

* **English** (``language="en"``): Whisper's own ``EnglishTextNormalizer`` (transformers' copy of
  OpenAI's): lower case, contractions and numbers spelled one way, British -> American spelling
  (the mapping OpenAI ships, vendored in ``resources/whisper_english_spelling.json``, MIT licence),
  fillers (uh, um) dropped, punctuation removed.
* **Every other language**: Unicode NFKC (full-width letters/digits -> ASCII), traditional ->
  simplified Chinese (zhconv, ``zh-cn``; a no-op on non-Chinese text), lower case, and every
  character whose Unicode category is punctuation (``P*``), symbol (``S*``), control/format
  (``C*``) or separator (``Z*``) turned into a space; runs of spaces collapse to one.
  Digits are kept as written: ``3`` and ``三`` still differ.

CER is computed on the normalised text with **all** whitespace removed (spaces carry no meaning
in Chinese/Japanese/Thai script); WER splits it on whitespace. Corpus rates are total edits /
total reference units (not a mean of per-utterance rates). ``metric_for(language)`` picks CER
for unsegmented scripts (zh, ja, ko, th, yue, lo, km, my, bo) and WER otherwise.

    >>> normalize("你們好，世界！")
    '你们好 世界'
    >>> round(cer(["我爱北京"], ["我爱南京"]), 2)
    0.25

``build_compute_metrics(processor, metric)`` returns the ``compute_metrics`` callback that
``Seq2SeqTrainer(predict_with_generate=True)`` calls with an ``EvalPrediction``.
"""
from __future__ import annotations

import functools
import json
import unicodedata
from dataclasses import asdict, dataclass
from importlib import resources
from typing import Callable, Dict, List, Optional, Sequence

# Scripts written without spaces between words: score them by character.
CER_LANGUAGES = {"zh", "ja", "ko", "th", "yue", "lo", "km", "my", "bo"}
_DROP_CATEGORIES = ("P", "S", "C", "Z")  # punctuation, symbols, control/format, separators


@functools.lru_cache(maxsize=1)
def _english_normalizer():
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    text = resources.files("loratune").joinpath("resources/whisper_english_spelling.json").read_text("utf-8")
    return EnglishTextNormalizer(json.loads(text))


def language_code(language: Optional[str]) -> str:
    """``"Chinese"`` / ``"<|zh|>"`` / ``"zh"`` -> ``"zh"`` (Whisper's codes); unknown names pass through."""
    lang = (language or "").lower().strip().strip("<|>")
    if len(lang) > 3:
        from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

        lang = TO_LANGUAGE_CODE.get(lang, lang)
    return lang


def _is_english(language: Optional[str]) -> bool:
    return language_code(language) == "en"


def normalize(text: str, language: Optional[str] = None) -> str:
    """Normalised form of ``text`` used for scoring (see the module docstring for the rules)."""
    if text is None:
        return ""
    if _is_english(language):
        return " ".join(_english_normalizer()(text).split())
    import zhconv

    text = zhconv.convert(unicodedata.normalize("NFKC", text), "zh-cn").lower()
    chars = [" " if unicodedata.category(ch)[0] in _DROP_CATEGORIES else ch for ch in text]
    return " ".join("".join(chars).split())


def metric_for(language: Optional[str], choice: str = "auto") -> str:
    """``cer`` or ``wer``: ``choice`` when it is not ``auto``, else by the language code."""
    if choice in ("cer", "wer"):
        return choice
    if choice != "auto":
        raise ValueError(f"metric {choice!r}: choose cer, wer or auto")
    return "cer" if language_code(language) in CER_LANGUAGES else "wer"


def units(normalised: str, metric: str) -> List[str]:
    """The units a rate counts: characters (whitespace ignored) for CER, words for WER."""
    return list("".join(normalised.split())) if metric == "cer" else normalised.split()


@dataclass
class EditCounts:
    """Levenshtein alignment counts of one utterance (units: characters for CER, words for WER)."""

    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0
    hits: int = 0

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def ref_len(self) -> int:
        return self.substitutions + self.deletions + self.hits

    @property
    def rate(self) -> float:
        """Errors / reference length; an empty reference scores 1.0 per inserted unit (0 if both empty)."""
        return self.errors / self.ref_len if self.ref_len else float(self.insertions)


def edit_counts(ref_norm: str, hyp_norm: str, metric: str) -> EditCounts:
    """Alignment counts between two already-normalised strings, through jiwer."""
    import jiwer

    ref_u, hyp_u = units(ref_norm, metric), units(hyp_norm, metric)
    if not ref_u or not hyp_u:  # jiwer wants non-empty inputs; the alignment is trivial anyway
        return EditCounts(deletions=len(ref_u), insertions=len(hyp_u))
    # Join units with single spaces so jiwer's word alignment works for characters too.
    out = jiwer.process_words(" ".join(ref_u), " ".join(hyp_u))
    return EditCounts(out.substitutions, out.deletions, out.insertions, out.hits)


@dataclass
class Scored:
    """One utterance: raw and normalised texts with its edit counts."""

    reference: str
    hypothesis: str
    reference_norm: str
    hypothesis_norm: str
    counts: EditCounts

    def row(self) -> Dict[str, object]:
        return {
            "reference": self.reference,
            "hypothesis": self.hypothesis,
            "reference_norm": self.reference_norm,
            "hypothesis_norm": self.hypothesis_norm,
            **asdict(self.counts),
            "errors": self.counts.errors,
            "ref_len": self.counts.ref_len,
            "rate": round(self.counts.rate, 4),
        }


def score(refs: Sequence[str], hyps: Sequence[str], metric: str = "cer", language: Optional[str] = None) -> tuple[float, List[Scored]]:
    """Corpus error rate (total edits / total reference units) and the per-utterance details."""
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if metric not in ("cer", "wer"):
        raise ValueError(f"metric {metric!r}: choose cer or wer")
    items = []
    for r, h in zip(refs, hyps):
        rn, hn = normalize(r, language), normalize(h, language)
        items.append(Scored(r, h, rn, hn, edit_counts(rn, hn, metric)))
    errors = sum(s.counts.errors for s in items)
    total = sum(s.counts.ref_len for s in items)
    rate = errors / total if total else (float(errors > 0))
    return rate, items


def cer(refs: Sequence[str], hyps: Sequence[str], language: Optional[str] = "zh") -> float:
    """Character error rate of normalised texts (whitespace ignored)."""
    return score(refs, hyps, "cer", language)[0]


def wer(refs: Sequence[str], hyps: Sequence[str], language: Optional[str] = "en") -> float:
    """Word error rate of normalised texts."""
    return score(refs, hyps, "wer", language)[0]


def build_compute_metrics(processor, metric: str = "cer", language: Optional[str] = None) -> Callable[[object], Dict[str, float]]:
    """``compute_metrics`` for ``Seq2SeqTrainer(predict_with_generate=True)``.

    Returns ``{"cer": x}`` (or ``{"wer": x}``); the trainer reports it as ``eval_cer``, which
    ``metric_for_best_model=eval_cer`` (lower is better) can select on. ``-100`` in labels (and in
    predictions, which the trainer pads with -100 across batches) becomes the pad token first.
    ``metric="auto"`` picks by ``language``, which defaults to the language the tokenizer's decoder
    prompt is set to (``tokenizer.set_prefix_tokens(language=...)``).
    """
    import numpy as np

    tokenizer = getattr(processor, "tokenizer", processor)
    language = language or getattr(tokenizer, "language", None)
    metric = metric_for(language, metric)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def compute_metrics(pred) -> Dict[str, float]:
        preds = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        preds = np.where(np.asarray(preds) < 0, pad_id, preds)
        labels = np.where(np.asarray(pred.label_ids) == -100, pad_id, pred.label_ids)
        hyps = tokenizer.batch_decode(preds, skip_special_tokens=True)
        refs = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return {metric: round(score(refs, hyps, metric, language)[0], 6)}

    return compute_metrics
