"""``loratune transcribe FILES|DIRS [model.name=..] [model.adapter=DIR] [key=value ...]``.

Transcribes audio files (wav/flac/mp3/ogg/m4a ...; folders are searched recursively) with a base
Whisper or base + LoRA adapter, writing ``<name>.txt``, ``.srt``, ``.vtt`` and ``.json`` (choose with
``transcribe.formats=[txt,srt]``) beside each file or into ``transcribe.output_dir``. Examples::

    loratune transcribe talk.mp3 model.name=whisper-base whisper.language=zh
    loratune transcribe recordings/ model.adapter=outputs/whisper-base-hsk-qlora transcribe.output_dir=out
    loratune transcribe clip.wav whisper.language=null        # detect the language

Clips up to 30 s are decoded in batches in one pass (no timestamp tokens unless
``whisper.timestamps=true``; the file is one segment). Longer files go through Whisper's own
sequential long-form algorithm (transformers' ``generate`` on un-truncated features): each 30-s
window is decoded with timestamp tokens and the next window starts at the last complete
segment's end, so words at window borders are neither lost nor doubled and the segments carry
real timestamps. ``transcribe.backend`` picks the engine: ``auto`` (default: ``ctranslate2`` on a CPU,
``transformers`` on a CUDA GPU, the faster of the two on each), ``ctranslate2`` (the cached
CTranslate2 copy of base + adapter, see ``asr/ct2_transcriber.py``) or ``transformers``. Files are checked (readable, not silent, not over
``transcribe.max_audio_seconds``) before the model loads.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from loratune.asr.transcriber import FORMATS, WINDOW_SECONDS, Transcriber, Transcript, check_audio, find_audio_files, render
from loratune.core.atomic import write_text
from loratune.core.audio import SAMPLE_RATE, load_audio
from loratune.errors import ConfigError, DataError

log = logging.getLogger(__name__)


# the config sections this verb reads: `loratune transcribe --help` lists only these
SECTIONS = ("model", "quant", "whisper", "transcribe")


def output_stems(files: Sequence[Path], output_dir: Optional[str]) -> Dict[Path, Path]:
    """Where each file's transcripts go (without the format suffix), never two on one name.

    Beside the audio by default; under ``output_dir`` the input folders' structure is kept (so
    ``a/x.wav`` and ``b/x.wav`` do not collide). Two inputs differing only in extension
    (``a.mp3``, ``a.wav``) keep it: ``a.mp3.txt``, ``a.wav.txt``."""
    import os
    from collections import Counter

    files = [Path(f) for f in files]
    root = Path(os.path.commonpath([str(f.resolve().parent) for f in files])) if files else Path(".")
    base = {f: (Path(output_dir) / f.resolve().parent.relative_to(root) if output_dir else f.parent) / f.stem for f in files}
    counts = Counter(base.values())
    clashes = {b for b, n in counts.items() if n > 1}
    return {f: (b.with_name(f.name) if b in clashes else b) for f, b in base.items()}


def transcribe_files(cfg, paths: Sequence[str], transcriber: Optional[Transcriber] = None) -> Dict[str, Transcript]:
    """Check, load, transcribe and write every file; returns ``{path: Transcript}``."""
    from tqdm.auto import tqdm

    opts = cfg.transcribe
    bad_formats = [f for f in opts.formats if f not in FORMATS]
    if bad_formats or not opts.formats:
        raise ConfigError(f"transcribe.formats={list(opts.formats)}: choose from {', '.join(FORMATS)}")
    files = find_audio_files(paths)
    audios: Dict[Path, np.ndarray] = {}
    for f in files:  # decode and check everything before the model loads
        try:
            audios[f] = check_audio(load_audio(f), str(f), opts.max_audio_seconds, opts.min_rms)
        except DataError as exc:
            if not opts.skip_bad_files:
                raise
            log.warning("skipping %s", exc)
    if not audios:
        raise DataError("no usable audio among the inputs (see the warnings above)")
    targets = output_stems(list(audios), opts.output_dir)
    if transcriber is None:
        from loratune.asr.ct2_transcriber import make_transcriber

        transcriber = make_transcriber(cfg)  # transcribe.backend
    # Long files first and alone (their long-form loop is sequential), then short clips in batches.
    order = sorted(audios, key=lambda f: -len(audios[f]))
    results: Dict[str, Transcript] = {}
    bar = tqdm(total=len(order), desc="transcribe", unit="file")
    i = 0
    while i < len(order):
        is_long = len(audios[order[i]]) > WINDOW_SECONDS * SAMPLE_RATE
        batch = order[i : i + (1 if is_long else max(1, opts.batch_size))]
        for f, t in zip(batch, transcriber([audios[f] for f in batch], max_new_tokens=opts.max_new_tokens)):
            results[str(f)] = t
            for fmt in opts.formats:
                write_text(targets[f].with_name(f"{targets[f].name}.{fmt}"), render(t, fmt))
        bar.update(len(batch))
        i += len(batch)
    bar.close()
    return results


def main(inv) -> int:
    cfg = inv.config()
    results = transcribe_files(cfg, inv.paths)
    for path, t in results.items():
        print(f"{path} [{t.language}, {t.duration:.1f} s]: {t.text}")
    return 0
