"""Atomic writes: every file and folder loratune produces appears whole or not at all.

A file is written to a temp name beside its target and renamed over it (``os.replace`` is atomic
on one file system); a folder is built in a temp folder beside its target and renamed into place.
A kill at any moment leaves either the old output or the new one, plus at worst a hidden
``.NAME.*`` temp entry, never a truncated adapter, cache or metrics file.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from loratune.errors import ModelError


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it replaces ``path``, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def _make_temp_dir(target: Path) -> Path:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other folder
    except OSError as exc:
        raise ModelError(f"{target.parent}: cannot write there ({exc.strerror or exc}); choose a writable directory") from exc
    return tmp


def atomic_dir(target: str | os.PathLike, build: Callable[[Path], Any], overwrite: bool = False,
               overwrite_key: Optional[str] = None, shared: bool = False) -> Path:
    """Run ``build(tmp_dir)`` in a temp folder beside ``target``, then rename it into place.

    ``overwrite``: replace a non-empty ``target`` (else ModelError naming ``overwrite_key``).
    ``shared``: a cache that other processes (DDP ranks) may build at the same time; when one of
    them finished first, its copy is kept and ours is dropped (they are equivalent).
    """
    target = Path(target)
    if not shared and target.exists() and any(target.iterdir()) and not overwrite:
        hint = f"; choose another or pass {overwrite_key}=true" if overwrite_key else "; choose another"
        raise ModelError(f"{target}: output directory exists and is not empty{hint}")
    tmp = _make_temp_dir(target)
    try:
        build(tmp)
        if shared:
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished first: keep its copy
                pass
        elif target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
