"""Streaming SFT corpora (``data.streaming=true``): large text corpora from parquet shards or the Hub.

    loratune train RECIPE task=sft data.streaming=true data.parquet='text/*.parquet' train.max_steps=5000 \\
        train.warmup_epochs=0 train.eval_strategy=steps train.eval_steps=500
    from loratune.llm.stream import build_sft_stream
    train_ds, eval_ds, report = build_sft_stream(cfg, tokenizer)   # datasets.IterableDataset, small Dataset

The same rows, template, masking and ``sft.too_long`` rules as :mod:`loratune.llm.data`
(``encode_row``), applied as rows pass instead of up front; TRL's SFTTrainer takes the resulting
``datasets.IterableDataset`` (pads, and packs with ``sft.packing``). The stream is endless: pass after
pass, reshuffled (:func:`loratune.core.streams.endless`), so ``--resume`` skips to the straight run's
batch. Checked up front: the options, that the source opens, its columns (prompt/completion or
messages), the validation rows (the first ``data.max_eval_samples``, 256 when unset, of
``data.eval_parquet`` / ``data.eval_split``, else held out from the front of the stream). Checked as
rows pass: empty prompts/answers (the first stops the run naming the row, or counted with
``data.skip_bad_rows``), over-long examples (counted); the counts land in ``summary.json``.
"""
from __future__ import annotations

import logging

from loratune.core.streams import check_pass, endless, open_stream
from loratune.llm.data import data_format, encode_row, new_counts, resolve_template

log = logging.getLogger(__name__)

DEFAULT_EVAL_ROWS = 256


def _examples(source, fmt, cfg, tokenizer, template, counts, stats):
    origin, used_before = source.loratune_origin, [0]
    for n, i, row in endless(source, cfg.data.seed, cfg.data.shuffle_buffer):
        check_pass(stats, n, origin, used_before)
        ex = encode_row(row, f"{origin} pass {n + 1} example {i}", fmt, cfg, tokenizer, template, counts)
        if ex is not None:
            stats["rows_used"] += 1
            yield ex


def _materialise(rows, fmt, cfg, tokenizer, template, name, limit):
    from datasets import Dataset

    counts = new_counts(0)
    out = []
    for i, row in enumerate(rows.take(limit)):
        counts["rows"] += 1
        ex = encode_row(row, f"{name} example {i}", fmt, cfg, tokenizer, template, counts)
        if ex is not None:
            out.append(ex)
    counts["examples"] = len(out)
    return (Dataset.from_list(out) if out else None), counts


def build_sft_stream(cfg, tokenizer):
    """(train IterableDataset, eval Dataset or None, report); see the module docstring."""
    from datasets import Features, IterableDataset, Value
    from datasets import List as DList

    template = resolve_template(tokenizer, cfg.sft, cfg.model.name)
    data = cfg.data
    train = open_stream(data, "train")
    origin = train.loratune_origin
    fmt = data_format(train.column_names, data)
    ev, eval_counts = None, None
    if cfg.train.eval_strategy != "no":
        n_eval = data.max_eval_samples or DEFAULT_EVAL_ROWS
        eval_src = open_stream(data, "eval")
        if eval_src is None:  # the front of the stream (stream order: the same rows every run), never trained on
            ev, eval_counts = _materialise(train, fmt, cfg, tokenizer, template, f"{origin} (held-out front)", n_eval)
            train = train.skip(n_eval)
        else:
            ev, eval_counts = _materialise(eval_src, data_format(eval_src.column_names, data), cfg, tokenizer, template,
                                           eval_src.loratune_origin, n_eval)
    if data.max_train_samples:
        train = train.take(data.max_train_samples)
    train.loratune_origin = origin
    counts, stats = new_counts(None), {"rows_read": 0, "rows_used": 0, "passes": 0}
    features = Features({"input_ids": DList(Value("int32")), "labels": DList(Value("int32"))})
    stream = IterableDataset.from_generator(_examples, features=features, gen_kwargs=dict(
        source=train, fmt=fmt, cfg=cfg, tokenizer=tokenizer, template=template, counts=counts, stats=stats))
    log.info("SFT streaming %s: template=%s, rows tokenised and checked as they pass; %d validation examples",
             origin, template, len(ev) if ev is not None else 0)
    report = {"template": template, "train": counts, "eval": eval_counts, "stream": stats, "streaming": True}
    return stream, ev, report
