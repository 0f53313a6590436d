"""Supervised fine-tuning data for causal LMs: load, check, format, tokenise, mask.

Sources (``data.*``): a Hub dataset id, a JSON-lines file, a CSV or a ``save_to_disk`` directory.
Rows are prompt/completion pairs (``data.prompt_column`` / ``data.completion_column``) or chat
``messages`` lists; ``data.rename`` / ``data.remove_columns`` adapt other layouts, e.g. Yoda's
``{sentence: prompt, translation_extra: completion}``. Each example is rendered with the tokenizer's
chat template (``sft.template=chat``) or the instruction template below, tokenised here, and given
``labels`` with the prompt masked (-100) when ``sft.completion_only_loss`` is on; TRL's SFTTrainer
then only pads, and packs when ``sft.packing`` is set. Every problem is reported before training::

    from loratune.llm.data import build_sft_datasets
    train_ds, eval_ds, report = build_sft_datasets(cfg, tokenizer)
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

from loratune.config import DataSection, RunConfig, SFTSection
from loratune.core.tables import adapt_columns, subset
from loratune.errors import ConfigError, DataError

log = logging.getLogger(__name__)

INSTRUCTION_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
"""The prompt part of the instruction format; the completion and EOS follow it directly."""


# --------------------------------------------------------------------------------------------
# loading and splitting


def _read_csv(path: Path):
    from datasets import Dataset

    with path.open(encoding="utf-8-sig", newline="") as fh:  # utf-8-sig: Excel writes a BOM
        rows = list(csv.DictReader(fh))
    if not rows:
        raise DataError(f"{path}: no data rows; the CSV needs a header line and at least one row")
    return Dataset.from_list(rows)


def _read_jsonl(path: Path):
    from datasets import Dataset

    rows = []
    with path.open(encoding="utf-8-sig") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg}); one JSON object per line") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}:{n}: a line is a {type(row).__name__}, expected a JSON object")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no examples; write one JSON object per line")
    return Dataset.from_list(rows)


def load_raw(data: DataSection):
    """The table(s) named by ``data.*``: a ``Dataset`` or a ``DatasetDict`` of named splits."""
    given = [k for k in ("csv", "jsonl", "disk", "hub", "parquet") if getattr(data, k)]
    if len(given) != 1:
        raise ConfigError(f"SFT data: set exactly one of data.csv, data.jsonl, data.disk, data.hub, data.parquet (got {given or 'none'})")
    kind = given[0]
    source = getattr(data, kind)
    if kind in ("csv", "jsonl", "disk") and not Path(source).exists():
        raise DataError(f"data.{kind}={source}: not found (relative paths are from the current directory)")
    if kind == "csv":
        return _read_csv(Path(source))
    if kind == "jsonl":
        return _read_jsonl(Path(source))
    import datasets

    if kind == "parquet":
        from loratune.core.tables import parquet_files

        return datasets.load_dataset("parquet", data_files=parquet_files(source), split="train")
    try:
        if kind == "disk":
            return datasets.load_from_disk(source)
        return datasets.load_dataset(source, data.hub_config)
    except Exception as exc:  # offline, missing config, corrupt directory ...
        raise DataError(f"data.{kind}={source}: cannot load ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                        "check the id/path, or save it with save_to_disk and use data.disk") from exc


def _select_split(table, name: str, data: DataSection):
    """Rows of split ``name`` (``a+b`` joins) from a DatasetDict or a table with a split column."""
    from datasets import DatasetDict, concatenate_datasets

    parts = []
    for part in name.split("+"):
        if isinstance(table, DatasetDict):
            if part not in table:
                raise DataError(f"split {part!r} not in the dataset (splits: {list(table)}); set data.train_split / data.eval_split")
            parts.append(table[part])
        else:
            rows = table.filter(lambda v: str(v).strip() == part, input_columns=data.split_column)
            if len(rows) == 0:
                values = sorted(set(map(str, table[data.split_column])))[:10]
                raise DataError(f"no rows with {data.split_column}={part!r} (values: {values}); set data.train_split / data.eval_split")
            parts.append(rows)
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def split_train_eval(data: DataSection):
    """(train, eval) tables after renames; eval comes from the named split or a seeded cut of train.

    A ``data.split_column`` (HSK's ``split`` = train/dev) decides when present, so dev rows are
    never trained on; otherwise Hub/disk splits, otherwise ``data.eval_ratio`` of the rows.
    """
    from datasets import DatasetDict

    raw = load_raw(data)
    if isinstance(raw, DatasetDict):
        raw = DatasetDict({k: adapt_columns(v, data) for k, v in raw.items()})
        has_split_col = False
    else:
        raw = adapt_columns(raw, data)
        has_split_col = data.split_column in raw.column_names
    if isinstance(raw, DatasetDict) or has_split_col:
        train = _select_split(raw, data.train_split, data)
        evald = _select_split(raw, data.eval_split, data) if data.eval_split else None
    else:
        if data.eval_split:
            raise DataError(f"data.eval_split={data.eval_split} but the data has no {data.split_column!r} column or named splits; "
                            "unset it to cut data.eval_ratio off the rows")
        train, evald = raw, None
    if evald is None:
        parts = train.train_test_split(test_size=data.eval_ratio, seed=data.seed)
        train, evald = parts["train"], parts["test"]
    return subset(train, data.max_train_samples, data.seed), subset(evald, data.max_eval_samples, data.seed)


# --------------------------------------------------------------------------------------------
# rows -> (prompt, completion) and rendering


def data_format(columns: List[str], data: DataSection) -> str:
    """``messages`` or ``prompt_completion``; a DataError naming the columns when neither fits."""
    if data.messages_column in columns:
        return "messages"
    if data.prompt_column in columns and data.completion_column in columns:
        return "prompt_completion"
    raise DataError(
        f"SFT data has columns {columns} but needs {data.prompt_column!r} + {data.completion_column!r} or "
        f"{data.messages_column!r}; map yours with data.rename (e.g. data.rename={{sentence: prompt, translation: completion}})"
    )


def resolve_template(tokenizer, sft: SFTSection, model_name: str = "") -> str:
    """``chat`` or ``instruction`` for this tokenizer; refuses ``chat`` without a chat template."""
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if sft.template == "chat" and not has_chat:
        raise ConfigError(f"sft.template=chat but the tokenizer of {model_name or 'this model'} has no chat template; "
                          "use sft.template=instruction (or auto)")
    if sft.template == "auto":
        return "chat" if has_chat else "instruction"
    return sft.template


def user_text(prompt: str, sft: SFTSection) -> str:
    return sft.prompt_format.format(prompt=prompt) if "{prompt}" in sft.prompt_format else f"{sft.prompt_format}{prompt}"


def _chat_prefix(sft: SFTSection) -> List[Dict[str, str]]:
    return [{"role": "system", "content": sft.system_prompt}] if sft.system_prompt else []


def render_prompt(tokenizer, sft: SFTSection, template: str, prompt: Any) -> str:
    """The text a model sees before its answer: ``prompt`` is a string or a list of chat messages."""
    if template == "chat":
        messages = prompt if isinstance(prompt, list) else _chat_prefix(sft) + [{"role": "user", "content": user_text(prompt, sft)}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(prompt, list):  # instruction template over chat data: the last user turn
        prompt = next(m["content"] for m in reversed(prompt) if m.get("role") == "user")
        return INSTRUCTION_TEMPLATE.format(prompt=prompt)
    return INSTRUCTION_TEMPLATE.format(prompt=user_text(prompt, sft))


def encode_prompt(tokenizer, text: str, template: str) -> List[int]:
    """Token ids of a rendered prompt; chat templates carry their own BOS, so none is added then."""
    return tokenizer(text, add_special_tokens=(template != "chat"))["input_ids"]


def _pair(row: Dict[str, Any], fmt: str, data: DataSection, where: str) -> Tuple[Any, str]:
    """(prompt or message history, completion) of one row; DataError on malformed/empty content."""
    if fmt == "messages":
        messages = row[data.messages_column]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DataError(f"{where}: {data.messages_column} must be a list of {{role, content}} objects")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer (roles: {[m['role'] for m in messages]})")
        prompt, completion = [dict(role=m["role"], content=m["content"]) for m in messages[:-1]], messages[-1]["content"]
    else:
        prompt, completion = row[data.prompt_column], row[data.completion_column]
        if prompt is None or not str(prompt).strip():
            raise DataError(f"{where}: empty {data.prompt_column!r}; fill it or set data.skip_bad_rows=true")
        prompt = str(prompt)
    if completion is None or not str(completion).strip():
        raise DataError(f"{where}: empty {'assistant answer' if fmt == 'messages' else repr(data.completion_column)}; "
                        "fill it or set data.skip_bad_rows=true")
    return prompt, str(completion)


def encode_example(tokenizer, sft: SFTSection, template: str, prompt: Any, completion: str) -> Tuple[List[int], int]:
    """(token ids of prompt + completion + end, number of leading prompt tokens)."""
    prompt_text = render_prompt(tokenizer, sft, template, prompt)
    if template == "chat":
        history = prompt if isinstance(prompt, list) else _chat_prefix(sft) + [{"role": "user", "content": user_text(prompt, sft)}]
        full_text = tokenizer.apply_chat_template(history + [{"role": "assistant", "content": completion}], tokenize=False)
        full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
    else:
        full = tokenizer(prompt_text + completion, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = encode_prompt(tokenizer, prompt_text, template)
    # Merges across the prompt/answer boundary can change the last prompt token: the answer starts
    # where the two token sequences first differ (as TRL does).
    n = 0
    for a, b in zip(prompt_ids, full):
        if a != b:
            break
        n += 1
    return full, n


def new_counts(rows) -> Dict[str, Any]:
    return {"rows": rows, "bad_rows": 0, "truncated": 0, "dropped_too_long": 0, "prompt_too_long": 0}


def encode_row(row: Dict[str, Any], where: str, fmt: str, cfg: RunConfig, tokenizer, template: str,
               counts: Dict[str, Any]):
    """One checked, tokenised example (``input_ids`` + ``labels``), or None when it is dropped and counted
    (a bad row with ``data.skip_bad_rows``, an over-long one per ``sft.too_long``); DataError otherwise."""
    data, sft = cfg.data, cfg.sft
    if data.id_column in row:
        where += f" ({data.id_column}={row[data.id_column]})"
    try:
        prompt, completion = _pair(row, fmt, data, where)
    except DataError:
        if not data.skip_bad_rows:
            raise
        counts["bad_rows"] += 1
        return None
    ids, n_prompt = encode_example(tokenizer, sft, template, prompt, completion)
    if len(ids) > sft.max_length:
        if sft.too_long == "drop":
            counts["dropped_too_long"] += 1
            return None
        if n_prompt >= sft.max_length:  # nothing of the answer would survive the cut
            counts["prompt_too_long"] += 1
            return None
        ids = ids[: sft.max_length]
        counts["truncated"] += 1
    labels = [-100] * n_prompt + ids[n_prompt:] if sft.completion_only_loss else list(ids)
    return {"input_ids": ids, "labels": labels}


def tokenize_rows(ds, cfg: RunConfig, tokenizer, template: str, name: str):
    """Check and tokenise a table; returns (Dataset of input_ids/labels, counts for the report)."""
    from datasets import Dataset

    data, sft = cfg.data, cfg.sft
    fmt = data_format(ds.column_names, data)
    out, counts = [], new_counts(len(ds))
    for i, row in enumerate(ds):
        ex = encode_row(row, f"{name} row {i}", fmt, cfg, tokenizer, template, counts)
        if ex is not None:
            out.append(ex)
    too_long = counts["truncated"] + counts["dropped_too_long"] + counts["prompt_too_long"]
    if too_long:
        log.warning("%s: %d of %d examples exceed sft.max_length=%d tokens: %d truncated, %d dropped (sft.too_long=%s), "
                    "%d dropped because the prompt alone fills it", name, too_long, len(ds), sft.max_length,
                    counts["truncated"], counts["dropped_too_long"], sft.too_long, counts["prompt_too_long"])
    if counts["bad_rows"]:
        log.warning("%s: skipped %d bad rows (data.skip_bad_rows=true)", name, counts["bad_rows"])
    if not out:
        raise DataError(f"{name}: no usable examples left of {len(ds)} (see the warnings above); raise sft.max_length or fix the data")
    counts["examples"] = len(out)
    return Dataset.from_list(out), counts


def build_sft_datasets(cfg: RunConfig, tokenizer):
    """(train Dataset, eval Dataset, report dict) ready for TRL's SFTTrainer."""
    template = resolve_template(tokenizer, cfg.sft, cfg.model.name)
    train_raw, eval_raw = split_train_eval(cfg.data)
    train_ds, train_counts = tokenize_rows(train_raw, cfg, tokenizer, template, "train")
    eval_ds, eval_counts = tokenize_rows(eval_raw, cfg, tokenizer, template, "eval")
    log.info("SFT data: %d train / %d eval examples, template=%s, completion_only_loss=%s, packing=%s",
             len(train_ds), len(eval_ds), template, cfg.sft.completion_only_loss, cfg.sft.packing)
    return train_ds, eval_ds, {"template": template, "train": train_counts, "eval": eval_counts}


def eval_pairs(cfg: RunConfig) -> List[Tuple[Any, str]]:
    """(prompt or message history, reference) of the held-out split, after ``eval.limit``.

    ``data.max_eval_samples`` (the validation-loss subset) does not apply: ``eval.limit`` decides.
    """
    import dataclasses

    _, eval_raw = split_train_eval(dataclasses.replace(cfg.data, max_eval_samples=None, max_train_samples=None))
    if cfg.eval.limit is not None and cfg.eval.limit < len(eval_raw):
        eval_raw = eval_raw.shuffle(seed=cfg.eval.shuffle_seed).select(range(cfg.eval.limit))
    fmt = data_format(eval_raw.column_names, cfg.data)
    pairs = []
    for i, row in enumerate(eval_raw):
        try:
            pairs.append(_pair(row, fmt, cfg.data, f"eval row {i}"))
        except DataError:
            if not cfg.data.skip_bad_rows:
                raise
    return pairs
