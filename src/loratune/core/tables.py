"""The table rules both wings share: column renames / removals and the seeded subset.

    from loratune.core.tables import adapt_columns, subset
    ds = adapt_columns(ds, cfg.data)                          # data.rename, data.remove_columns
    train = subset(train, cfg.data.max_train_samples, cfg.data.seed)

One rule each (the two loaders used to disagree): a ``data.rename`` of a column the data does not
have is an error naming the real columns; a ``data.remove_columns`` entry that is absent is only
warned about (removing nothing is harmless); ``max_*_samples`` draws a seeded shuffle.
"""
from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import List, Optional

from loratune.errors import DataError

log = logging.getLogger(__name__)


def adapt_columns(ds, data, origin: str = "the data"):
    """``data.rename`` then ``data.remove_columns`` on a ``datasets.Dataset``."""
    missing = [old for old in data.rename if old not in ds.column_names]
    if missing:
        raise DataError(f"data.rename names {missing} but {origin}'s columns are {ds.column_names}; fix data.rename")
    if data.rename:
        ds = ds.rename_columns(dict(data.rename))
    drop = [c for c in data.remove_columns if c in ds.column_names]
    if len(drop) < len(data.remove_columns):
        log.warning("data.remove_columns: %s not present (columns: %s)", sorted(set(data.remove_columns) - set(drop)), ds.column_names)
    return ds.remove_columns(drop) if drop else ds


def subset(ds, n: Optional[int], seed: int):
    """The first ``n`` rows of a seeded shuffle (all rows when ``n`` is None or not smaller)."""
    if n is None or n >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(n))


def parquet_files(spec: str, key: str = "data.parquet") -> List[str]:
    """The files a ``data.parquet`` value names (paths or globs, comma-separated), sorted; one-line error if none."""
    files: List[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        found = sorted(glob.glob(os.path.expanduser(part), recursive=True))
        if not found:
            raise DataError(f"{key}={part}: no file matches (relative paths are from {Path.cwd()}); fix the path or glob")
        files += found
    return files
