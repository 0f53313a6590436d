"""Streaming ASR corpora: train from parquet shards or a Hub dataset without materialising them.

    loratune train RECIPE data.streaming=true data.parquet='shards/*.parquet' train.max_steps=2000 \\
        train.warmup_epochs=0 train.warmup_steps=100 train.eval_strategy=steps train.eval_steps=500
    from loratune.asr.stream import prepare_streaming_asr
    data = prepare_streaming_asr(cfg, processor)   # ASRData: train = ASRStream, eval = a small Dataset

The rows come from ``datasets`` streaming (``load_dataset(..., streaming=True)``), shuffled by its
shard order + ``data.shuffle_buffer`` examples; nothing is decoded or cached ahead. Each row is
decoded (16-kHz int16, as ``data.features=audio`` caches it), tokenised and checked as it passes;
the collator computes log-mels per batch (``asr.collator``), so augmentation works as with the
audio cache.

What is checked where, since the corpus is never read whole before training:

* up front (before the model loads): the options (``config._check_streaming``), that the source
  opens, its columns (audio, text; a split column is refused: a stream cannot be split by it
  without reading it all), and every validation row (decoded, tokenised, materialised: at most
  ``data.max_eval_samples``, 256 when unset);
* as rows pass, during training: empty transcript, over-long transcript, unreadable audio, clip over
  ``data.max_audio_seconds``. The first bad row stops the run with one line naming it, or with
  ``data.skip_bad_rows`` it is dropped and counted (``summary.json``: ``skipped_by_reason``, plus
  ``stream`` = rows read / used / passes), the first of each kind logged when met.

Length: one stream pass may be shorter than ``train.max_steps`` batches; the stream then starts
over with the next shuffle (seed + pass), so the Trainer sees one endless epoch and ``--resume``
skips exactly the batches a straight run consumed (the Trainer's own skipping: those rows are read
and decoded again, not trained on). Rows counted as bad are counted again on a later pass.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import numpy as np

from loratune.asr.features import ASRData, _Checker, set_prefix_tokens
from loratune.asr.sources import AUDIO, TEXT, _where, decode
from loratune.core.audio import SAMPLE_RATE
from loratune.core.streams import check_pass, endless
from loratune.core.streams import open_stream as core_open_stream
from loratune.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_EVAL_ROWS = 256


def open_stream(data, which: str = "train"):
    """The streamed source (:func:`loratune.core.streams.open_stream`) with the ASR columns checked and
    renamed to __audio, __text (+ the id column when present), or None without a separate eval source."""
    from datasets import Audio, Value

    ds = core_open_stream(data, which)
    if ds is None:
        return None
    origin, cols = ds.loratune_origin, ds.column_names
    for col, key in ((data.audio_column, "data.audio_column"), (data.text_column, "data.text_column")):
        if col not in cols:
            raise DataError(f"{origin}: no column {col!r} (columns: {', '.join(cols)}); set {key}=<name> or data.rename")
    if isinstance(ds.features[data.audio_column], Audio):
        # keep the encoded bytes (PyAV decodes them, asr.sources) and read the column as its plain storage:
        # a streamed Audio feature re-encodes every example, which needs torchcodec
        ds = ds.cast_column(data.audio_column, {"bytes": Value("binary"), "path": Value("string")})
    keep = [data.audio_column, data.text_column] + ([data.id_column] if data.id_column in cols else [])
    ds = ds.select_columns(keep).rename_columns({data.audio_column: AUDIO, data.text_column: TEXT})
    ds.loratune_origin = origin
    return ds


class RowChecker:
    """Decode + tokenise + check one streamed row: the example dict, or None (bad row, skipped and counted)."""

    def __init__(self, data, tokenizer, max_label_tokens: int, checker: _Checker, id_column: str):
        self.data, self.tokenizer, self.max_tokens, self.checker, self.id_column = data, tokenizer, max_label_tokens, checker, id_column

    def __call__(self, row: Dict[str, Any], ref: str) -> Optional[Dict[str, Any]]:
        audio, text = row[AUDIO], row[TEXT]
        if isinstance(audio, (bytes, bytearray)):  # a plain binary column of encoded files
            audio = {"bytes": bytes(audio), "path": None}
        if row.get(self.id_column) is not None:
            ref = f"{ref} ({self.id_column}={row[self.id_column]})"
        where = _where(ref, audio)
        if not (text or "").strip():
            return self._bad("empty transcript", f"{where}: empty transcript; fill in the text")
        ids = self.tokenizer(text).input_ids
        if len(ids) > self.max_tokens:
            return self._bad("transcript too long", f"{where}: transcript is {len(ids)} tokens, over Whisper's "
                             f"{self.max_tokens}-token decoder limit; split the clip/text")
        try:
            wave = decode(audio)
        except DataError as exc:
            return self._bad("unreadable audio", f"{ref}: {exc}; replace the file")
        if len(wave) > self.data.max_audio_seconds * SAMPLE_RATE:
            return self._bad("audio too long", f"{where}: clip is {len(wave) / SAMPLE_RATE:.1f} s, longer than "
                             f"data.max_audio_seconds={self.data.max_audio_seconds:g}; cut it")
        pcm = (np.clip(wave, -1.0, 1.0) * 32767.0).round().astype(np.int16)
        return {"audio": pcm, "labels": ids, "input_length": len(pcm), "ref": ref}

    def _bad(self, reason: str, msg: str) -> None:
        first = reason not in self.checker.first
        self.checker.bad(reason, msg)  # raises unless data.skip_bad_rows
        if first:
            log.warning("skipping bad rows as they pass (data.skip_bad_rows=true); first %s: %s", reason, msg)
        return None


def _torch_iterable():
    from torch.utils.data import IterableDataset

    return IterableDataset


class ASRStream(_torch_iterable()):
    """The training stream the Trainer reads: endless (pass after pass, reshuffled), no ``__len__``.

    ``augment``: mark every example for the collator's augmentation (evaluation rows never are).
    """

    def __init__(self, source, check: RowChecker, stats: Dict[str, int], seed: int, shuffle_buffer: int):
        self.source, self.check, self.stats = source, check, stats
        self.seed, self.shuffle_buffer, self.augment = seed, shuffle_buffer, False

    def __iter__(self):
        origin = getattr(self.source, "loratune_origin", "stream")
        used_before = [0]
        for n, i, row in endless(self.source, self.seed, self.shuffle_buffer):
            check_pass(self.stats, n, origin, used_before)
            ex = self.check(row, f"{origin} pass {n + 1} example {i}")
            if ex is None:
                continue
            self.stats["rows_used"] += 1
            if self.augment:
                ex["augment"] = True
            yield ex


def _materialise(rows, check: RowChecker, origin: str, limit: int):
    """The first ``limit`` usable rows of a stream as a small in-memory Dataset (validation)."""
    from datasets import Dataset, Features, Value
    from datasets import List as DList

    out = []
    for i, row in enumerate(rows.take(limit)):
        ex = check(row, f"{origin} example {i}")
        if ex is not None:
            out.append(ex)
    if not out:
        return None
    feats = Features({"audio": DList(Value("int16")), "labels": DList(Value("int32")), "input_length": Value("int32"),
                      "ref": Value("string")})
    return Dataset.from_list(out, features=feats)


def prepare_streaming_asr(cfg, processor, max_label_tokens: int = 448) -> ASRData:
    """The training stream + a bounded, checked validation set; see the module docstring."""
    data = cfg.data
    set_prefix_tokens(processor.tokenizer, cfg.whisper)
    checker = _Checker(data, data.skip_bad_rows)
    check = RowChecker(data, processor.tokenizer, max_label_tokens, checker, data.id_column)
    train = open_stream(data, "train")
    origin = train.loratune_origin
    ev = None
    n_eval = data.max_eval_samples or DEFAULT_EVAL_ROWS
    if cfg.train.eval_strategy != "no":
        eval_src = open_stream(data, "eval")
        if eval_src is None:  # hold out the front of the training stream (stream order: the same rows every run)
            ev = _materialise(train, check, f"{origin} (held-out front)", n_eval)
            train = train.skip(n_eval)
        else:
            ev = _materialise(eval_src, check, eval_src.loratune_origin, n_eval)
        log.info("streaming: %d validation rows checked and held in memory", len(ev) if ev is not None else 0)
    if data.max_train_samples:
        train = train.take(data.max_train_samples)
    train.loratune_origin = origin
    stats = {"rows_read": 0, "rows_used": 0, "passes": 0}
    stream = ASRStream(train, check, stats, data.seed, data.shuffle_buffer)
    report = {"train_rows": None, "eval_rows": len(ev) if ev is not None else 0, "skipped": checker.skipped,
              "skipped_examples": checker.first, "stream": stats, "streaming": True}
    log.info("streaming %s: rows are decoded, tokenised and checked as they pass (shuffle buffer %d)", origin,
             data.shuffle_buffer)
    return ASRData(stream, ev, report)
