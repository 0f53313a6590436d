"""Raw ASR tables: read a CSV + audio folder, a Hub dataset or a ``save_to_disk`` folder, then split.

    from loratune.asr.sources import load_raw_splits, REF, AUDIO, TEXT
    train, ev = load_raw_splits(cfg.data)   # datasets.Dataset with columns __ref, __audio, __text

Used by :mod:`loratune.asr.features` (training features) and by evaluation (same sources and split
rules). ``__audio`` is a file path (CSV) or datasets' undecoded ``{"bytes", "path"}`` (Hub/disk);
:func:`decode` turns either into 16 kHz mono float32 through PyAV.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from loratune.core.audio import SAMPLE_RATE, load_audio
from loratune.core.tables import adapt_columns, parquet_files, subset
from loratune.errors import DataError

log = logging.getLogger(__name__)

REF, AUDIO, TEXT = "__ref", "__audio", "__text"  # normalised raw columns


# ------------------------------------------------------------------------------------------------
# raw tables


def _resolve_audio_dir(csv_path: Path, audio_dir: Optional[str]) -> Path:
    """``audio_dir`` as given (absolute or relative to the cwd), else relative to the CSV's folder;
    without it, the CSV's folder when the file names resolve there, else ``<csv folder>/audio``."""
    if audio_dir:
        p = Path(audio_dir).expanduser()
        if p.is_absolute() or p.is_dir():
            return p
        beside = csv_path.parent / p
        if beside.is_dir():
            return beside
        raise DataError(f"data.audio_dir={audio_dir}: folder not found (looked in {Path.cwd()} and {csv_path.parent}); fix the path")
    return csv_path.parent


def read_csv_table(data) -> Tuple[List[Dict[str, str]], Path]:
    """Rows of ``data.csv`` (UTF-8 with or without BOM) with renames applied; one-line errors."""
    path = Path(data.csv).expanduser()
    if not path.is_file():
        raise DataError(f"data.csv={data.csv}: file not found; give the path of the CSV (ID, sentence)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}: not UTF-8 (byte 0x{raw[exc.start]:02x} on line {line}); re-save it as UTF-8, "
            f"e.g. `iconv -f GBK -t UTF-8 {path.name} > fixed.csv`"
        ) from exc
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [old for old in data.rename if old not in (reader.fieldnames or [])]
    if missing:  # the rule of core.tables.adapt_columns, applied to the header
        raise DataError(f"data.rename names {missing} but {path}'s columns are {list(reader.fieldnames or [])}; fix data.rename")
    header = [data.rename.get(h, h) for h in (reader.fieldnames or [])]
    for col, key in ((data.id_column, "data.id_column"), (data.text_column, "data.text_column")):
        if col not in header:
            raise DataError(f"{path}: no column {col!r} (columns: {', '.join(h.encode('unicode_escape').decode() for h in header) or 'none'}); set {key}=<name> or rename it in the file")
    rows = []
    for row in reader:
        rows.append({data.rename.get(k, k): (v or "") for k, v in row.items() if k is not None})
    return _drop_duplicate_ids(rows, path, data), path


def _drop_duplicate_ids(rows: List[Dict[str, str]], path: Path, data) -> List[Dict[str, str]]:
    """One row per clip: a repeated ID (the same audio twice, perhaps with two transcripts, perhaps
    in train and eval) is an error naming the lines, or with ``data.skip_bad_rows`` only the first
    row of each ID is kept and the others are counted in a warning."""
    seen: Dict[str, int] = {}
    dupes: List[Tuple[int, int, str]] = []
    kept = []
    for i, row in enumerate(rows):
        key = row[data.id_column].strip()
        if key and key in seen:
            dupes.append((seen[key] + 2, i + 2, key))  # header is line 1
            continue
        seen.setdefault(key, i)
        kept.append(row)
    if dupes and not data.skip_bad_rows:
        first, again, key = dupes[0]
        more = f" (and {len(dupes) - 1} more repeated IDs)" if len(dupes) > 1 else ""
        raise DataError(f"{path} lines {first} and {again}: ID {key!r} appears twice{more}; keep one row per clip, "
                        "or set data.skip_bad_rows=true to keep only the first")
    if dupes:
        log.warning("%s: %d rows repeat an earlier ID and were skipped (first: line %d, ID %r)", path, len(dupes), dupes[0][1], dupes[0][2])
    return kept


def _csv_dataset(data):
    from datasets import Dataset

    rows, path = read_csv_table(data)
    base = _resolve_audio_dir(path, data.audio_dir)
    if not data.audio_dir and rows and not (base / rows[0][data.id_column]).exists() and (base / "audio").is_dir():
        base = base / "audio"
    cols = {REF: [], AUDIO: [], TEXT: []}
    has_split = data.split_column in (rows[0] if rows else {})
    if has_split:
        cols[data.split_column] = []
    for i, row in enumerate(rows):
        cols[REF].append(f"{path.name} line {i + 2}")  # header is line 1
        name = row[data.id_column].strip()
        cols[AUDIO].append(str(Path(name) if Path(name).is_absolute() else base / name) if name else "")
        cols[TEXT].append(row[data.text_column])
        if has_split:
            cols[data.split_column].append(row[data.split_column].strip())
    return Dataset.from_dict(cols)


def _normalise(ds, data, origin: str):
    """Rename/drop columns, check the audio and text columns, keep only what training uses."""
    from datasets import Audio

    ds = adapt_columns(ds, data, origin)  # the one rename/remove rule of both wings (core.tables)
    for col, key in ((data.audio_column, "data.audio_column"), (data.text_column, "data.text_column")):
        if col not in ds.column_names:
            raise DataError(f"{origin}: no column {col!r} (columns: {', '.join(c.encode('unicode_escape').decode() for c in ds.column_names)}); set {key}=<name> or data.rename")
    # Decoding goes through PyAV (loratune.core.audio) at 16 kHz, so the cast only records the rate
    # and keeps the encoded bytes; it avoids the datasets audio back-end dependency.
    ds = ds.cast_column(data.audio_column, Audio(sampling_rate=SAMPLE_RATE, decode=False))
    keep = [data.audio_column, data.text_column] + ([data.split_column] if data.split_column in ds.column_names else [])
    ds = ds.select_columns(keep)
    ds = ds.add_column(REF, [f"{origin} row {i}" for i in range(len(ds))])
    return ds.rename_columns({data.audio_column: AUDIO, data.text_column: TEXT})


def _join(parts: Dict[str, Any], spec: str, origin: str):
    from datasets import concatenate_datasets

    names = [s.strip() for s in spec.split("+") if s.strip()]
    missing = [n for n in names if n not in parts]
    if missing:
        raise DataError(f"{origin}: no split {missing[0]!r} (splits: {', '.join(parts)}); set data.train_split / data.eval_split")
    return concatenate_datasets([parts[n] for n in names]) if len(names) > 1 else parts[names[0]]


def _split_table(ds, data):
    """(train, eval) from one table: by ``split_column`` when present, else seeded ratio."""
    col = data.split_column
    if col in ds.column_names:
        values = ds[col]
        train_vals = {s.strip() for s in data.train_split.split("+")}
        train = ds.select([i for i, v in enumerate(values) if v in train_vals])
        if data.eval_split:
            eval_vals = {s.strip() for s in data.eval_split.split("+")}
            ev = ds.select([i for i, v in enumerate(values) if v in eval_vals])
            return train, ev
        ds = train
    if len(ds) < 2:
        return ds, None
    parts = ds.train_test_split(test_size=data.eval_ratio, seed=data.seed)
    return parts["train"], parts["test"]


def load_raw_splits(data, need_train: bool = True):
    """(train, eval) tables with columns __ref, __audio, __text, before validation and features.
    ``need_train=False`` (evaluation): a table with only evaluation rows is fine."""
    import datasets

    if sum(bool(x) for x in (data.csv, data.hub, data.disk, data.parquet)) != 1:
        raise DataError("set exactly one of data.csv, data.hub, data.disk, data.parquet (the training data source)")
    if data.parquet:
        def table(spec, key):
            return _normalise(datasets.load_dataset("parquet", data_files=parquet_files(spec, key), split="train"), data,
                              f"{key}={spec}")

        train = table(data.parquet, "data.parquet")
        if data.eval_parquet:
            ev = table(data.eval_parquet, "data.eval_parquet")
        else:
            train, ev = _split_table(train, data)
    elif data.csv:
        train, ev = _split_table(_csv_dataset(data), data)
    elif data.disk:
        path = Path(data.disk).expanduser()
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"data.disk={data.disk}: not a dataset saved with save_to_disk ({exc.__class__.__name__}); fix the path") from exc
        if isinstance(loaded, datasets.DatasetDict):
            parts = {k: _normalise(v, data, f"{path.name}/{k}") for k, v in loaded.items()}
            train = _join(parts, data.train_split, str(path))
            ev = _join(parts, data.eval_split, str(path)) if data.eval_split else None
            if ev is None:
                train, ev = _split_table(train.remove_columns([c for c in [data.split_column] if c in train.column_names]), data)
        else:
            train, ev = _split_table(_normalise(loaded, data, path.name), data)
    else:
        def hub_split(spec):
            try:
                ds = datasets.load_dataset(data.hub, data.hub_config, split=spec)
            except Exception as exc:
                raise DataError(
                    f"data.hub={data.hub} (config {data.hub_config}, split {spec}): cannot load "
                    f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}); check name/config/split, "
                    "accept the dataset's terms and log in, or use data.csv / data.disk"
                ) from exc
            return _normalise(ds, data, f"{data.hub}:{spec}")

        train = hub_split(data.train_split)
        ev = hub_split(data.eval_split) if data.eval_split else None
        if ev is None:
            train, ev = _split_table(train.remove_columns([c for c in [data.split_column] if c in train.column_names]), data)
    train = subset(train, data.max_train_samples, data.seed)
    ev = subset(ev, data.max_eval_samples, data.seed) if ev is not None else None
    if len(train) == 0 and need_train:
        if data.csv and not len(_csv_dataset(data)):
            raise DataError(f"{data.csv}: no data rows (only a header?); add rows of {data.id_column},{data.text_column}")
        raise DataError(f"no training rows (split {data.train_split!r} of column {data.split_column!r} is empty?); check data.train_split / the data source")
    return train, (ev if ev is not None and len(ev) else None)


# ------------------------------------------------------------------------------------------------
# decoding


def decode(value: Any) -> np.ndarray:
    """Audio cell -> 16 kHz mono float32: a path string, or the ``{"bytes", "path"}`` of datasets' Audio."""
    if isinstance(value, str):
        return load_audio(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            suffix = Path(value.get("path") or "x.wav").suffix or ".wav"
            fd, tmp = tempfile.mkstemp(suffix=suffix)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(value["bytes"])
                return load_audio(tmp)
            except DataError as exc:  # name the row's file, not the temp copy
                raise DataError(str(exc).replace(tmp, value.get("path") or "<embedded audio>")) from exc
            finally:
                os.unlink(tmp)
        if value.get("path"):
            return load_audio(value["path"])
    raise DataError(f"audio cell {str(value)[:60]!r} holds neither a path nor bytes; fix the audio column")


def _where(ref: str, audio: Any) -> str:
    path = audio if isinstance(audio, str) else (audio or {}).get("path") if isinstance(audio, dict) else None
    return f"{ref} ({path})" if path else ref



_decode = decode  # older name, kept for callers
