"""``loratune convert``: a CTranslate2 Whisper checkpoint (faster-whisper layout) -> Hugging Face directory.

    loratune convert faster-whisper-base/ convert.output_dir=whisper-base-hf
    loratune convert faster-whisper-large-v3/ whisper-large-v3-hf convert.dtype=float16

The checkpoint folder holds ``model.bin``, ``config.json``, ``tokenizer.json`` and ``vocabulary.*``
(float32/float16/bfloat16 or int8-quantised, any Whisper size, 80 or 128 mel bins). The result
loads with ``WhisperForConditionalGeneration.from_pretrained`` / ``WhisperProcessor.from_pretrained``
and is used as ``model.name=DIR`` by every other verb. It is written to a temp folder and renamed
into place, so an interrupted run leaves nothing half-written.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from loratune.errors import ConfigError

log = logging.getLogger(__name__)


# the config sections this verb reads: `loratune convert --help` lists only these
SECTIONS = ("convert",)


def main(inv) -> int:
    from loratune.asr.ct2_convert import convert_ct2_whisper

    cfg = inv.config()
    if not inv.paths:
        raise ConfigError("loratune convert needs the CTranslate2 checkpoint folder: loratune convert CT2_DIR convert.output_dir=OUT")
    if len(inv.paths) > 2:
        raise ConfigError(f"loratune convert takes one checkpoint (and optionally the output folder), got {inv.paths}")
    src = Path(inv.paths[0])
    out = cfg.convert.output_dir or (inv.paths[1] if len(inv.paths) > 1 else None) or f"{src.resolve()}-hf"
    started = time.perf_counter()
    result = convert_ct2_whisper(src, out, dtype=cfg.convert.dtype, overwrite=cfg.convert.overwrite)
    log.info("converted %s -> %s in %.1f s", src, result, time.perf_counter() - started)
    print(result)
    return 0
