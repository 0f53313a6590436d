"""ASR training data: load, split, validate, extract log-mel features once, cache them on disk.

    from loratune.asr.features import prepare_asr_data
    data = prepare_asr_data(cfg, processor, max_label_tokens=448)
    data.train, data.eval      # datasets.Dataset: input_features (frames, mels), labels, input_length
    data.report                # rows read / skipped per reason / cache hit

Sources (``cfg.data``, read by :mod:`loratune.asr.sources`): a CSV + audio folder (``csv``, ``audio_dir``, ``id_column``, ``text_column``),
a Hub dataset (``hub``, ``hub_config``; ``train+validation`` joins splits; audio cast to 16 kHz) or a
``save_to_disk`` directory (``disk``). Rows are split by ``split_column`` when the table has it,
else by ``eval_ratio`` with ``seed``. Every row is checked before training (missing/corrupt audio,
empty transcript, clip over ``max_audio_seconds``, transcript over the decoder limit): the first bad
row stops the run with one line, or with ``skip_bad_rows`` all bad rows are dropped and counted.
Features + token ids are written to ``cache_dir/<key>`` where the key hashes the selected rows
(file sizes and mtimes included), the processor and the options that change the features, so a
second run with the same inputs goes straight to training.

What is cached (``data.features``): ``log_mel`` stores float32 log-mels (frames x mels; 32 KB per
second of audio with 80 mels in short-clip mode, 0.96 MB per clip padded to 30 s); ``audio`` stores
the decoded 16-kHz audio as int16 (32 KB per second, whatever the mel count or padding) and the
collator computes log-mels per batch, which is what on-the-fly augmentation (``augment.*``) needs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from loratune.asr.sources import AUDIO, REF, TEXT, _decode, _where, decode, load_raw_splits, read_csv_table  # noqa: F401 (re-exported)
from loratune.core.audio import SAMPLE_RATE
from loratune.errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class ASRData:
    train: Any
    eval: Optional[Any]
    report: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# validation + features


class _Checker:
    """Per-row checks; ``bad(reason, msg)`` raises unless bad rows are being skipped."""

    def __init__(self, data, skip: bool):
        self.data, self.skip = data, skip
        self.skipped: Counter = Counter()
        self.first: Dict[str, str] = {}

    def bad(self, reason: str, msg: str) -> None:
        """``msg`` names the row and the fix; the way out (skipping) is added only when it applies."""
        if not self.skip:
            raise DataError(f"{msg} or set data.skip_bad_rows=true")
        self.skipped[reason] += 1
        self.first.setdefault(reason, msg)


def _tokenise_and_precheck(ds, tokenizer, checker: _Checker, max_label_tokens: int) -> Dict[int, List[int]]:
    """Cheap checks on every row first (empty text, missing file, token limit), so they fail fast."""
    refs, texts = list(ds[REF]), list(ds[TEXT])
    # file checks only for path strings (CSV); Hub/disk audio is checked when decoded, so its
    # (possibly large) bytes are not all pulled into memory here
    audios = list(ds[AUDIO]) if _is_path_column(ds) else [None] * len(ds)
    ids = tokenizer([t or "" for t in texts]).input_ids
    ok: Dict[int, List[int]] = {}
    for i, (ref, audio, text, tok) in enumerate(zip(refs, audios, texts, ids)):
        where = _where(ref, audio)
        if not (text or "").strip():
            checker.bad("empty transcript", f"{where}: empty transcript; fill in the text")
        elif isinstance(audio, str) and not audio:
            checker.bad("missing audio", f"{ref}: no audio file name; fill in the {checker.data.id_column} column")
        elif isinstance(audio, str) and not os.path.isfile(audio):
            checker.bad("missing audio", f"{where}: audio file not found; check data.audio_dir")
        elif len(tok) > max_label_tokens:
            checker.bad(
                "transcript too long",
                f"{where}: transcript is {len(tok)} tokens, over Whisper's {max_label_tokens}-token decoder limit; "
                "split the clip/text",
            )
        else:
            ok[i] = tok
    return ok


_WORKER: Dict[str, Any] = {}  # settings of the current extraction, shared by its worker threads


def _init_worker(feature_extractor, max_seconds: float, trim: bool, audio_only: bool = False) -> None:
    _WORKER.update(fe=feature_extractor, max_s=max_seconds, trim=trim, audio_only=audio_only)


def _featurise(item: Tuple[str, Any]) -> Tuple[Optional[np.ndarray], int, Optional[Tuple[str, str]]]:
    """(frames-major log-mel, samples, None) or (None, 0, (reason, message)) for one row."""
    ref, audio_value = item
    try:
        audio = _decode(audio_value)
    except DataError as exc:
        return None, 0, ("unreadable audio", f"{ref}: {exc}; replace the file")
    seconds = len(audio) / SAMPLE_RATE
    if seconds > _WORKER["max_s"]:
        return None, 0, ("audio too long", f"{_where(ref, audio_value)}: clip is {seconds:.1f} s, longer than "
                         f"data.max_audio_seconds={_WORKER['max_s']:g}; cut it")
    if _WORKER["audio_only"]:  # data.features=audio: log-mels come later, per batch (collator)
        return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype(np.int16), len(audio), None
    mel = _WORKER["fe"](audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]
    if _WORKER["trim"]:  # the clip's real length in frames, even (encoder stride 2), at most 30 s
        from loratune.asr.trim import trimmed_num_frames

        mel = mel[:, :trimmed_num_frames(len(audio))]
    return np.ascontiguousarray(mel.T, dtype=np.float32), len(audio), None


def _bounded_map(pool, fn, items, window: int):
    """``pool.map`` in order, but with at most ``window`` results in memory (features are large)."""
    from itertools import islice

    items = iter(items)
    while True:
        chunk = list(islice(items, window))
        if not chunk:
            return
        yield from pool.map(fn, chunk)


def _features(ds, token_ids: Dict[int, List[int]], feature_extractor, checker: _Checker, trim: bool, path: Path,
              num_proc: int = 1, desc: str = "features", audio_only: bool = False) -> int:
    """Decode + log-mel (or, ``audio_only``, just decode) every row that passed the cheap checks
    (``num_proc`` worker threads); stream them into an Arrow file at ``path``; returns the number of
    rows written."""
    from concurrent.futures import ThreadPoolExecutor

    from datasets import Array2D, Features, Value
    from datasets import List as DList
    from datasets.arrow_writer import ArrowWriter
    from tqdm.auto import tqdm

    feats = Features({
        **({"audio": DList(Value("int16"))} if audio_only else
           {"input_features": Array2D(shape=(None, feature_extractor.feature_size), dtype="float32")}),  # frames-major: see collator
        "labels": DList(Value("int32")),
        "input_length": Value("int32"),  # samples, for length-grouped batches
        "ref": Value("string"),
    })
    order = list(token_ids)
    refs = list(ds[REF])
    items = ((refs[i], ds[i][AUDIO]) for i in order)
    _init_worker(feature_extractor, checker.data.max_audio_seconds, trim, audio_only)
    pool = None
    if num_proc > 1:
        # Threads, not processes: FFmpeg decoding and numpy's FFT release the GIL, and a forked child
        # can inherit locks held by PyTorch/tokenizers threads and hang (spawn re-imports everything).
        pool = ThreadPoolExecutor(max_workers=num_proc)
        results = _bounded_map(pool, _featurise, items, window=16 * num_proc)
    else:
        results = map(_featurise, items)
    written = 0
    import torch

    # One intra-op thread per clip: the feature extractor's small FFTs get slower, not faster, with
    # more threads (measured 27 ms vs 263 ms per clip on a busy 2-core machine); num_proc scales out.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ArrowWriter(features=feats, path=str(path)) as writer:
            for i, (mel, n, err) in tqdm(zip(order, results), total=len(order), desc=desc, unit="clip"):
                if err is not None:
                    checker.bad(*err)  # raises unless bad rows are skipped
                    continue
                writer.write({"audio" if audio_only else "input_features": mel, "labels": token_ids[i], "input_length": n,
                              "ref": refs[i]})
                written += 1
            writer.finalize()
    finally:
        torch.set_num_threads(threads)
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return written


def _is_path_column(ds) -> bool:
    feature = ds.features[AUDIO]
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _rows(ds, batch_size: int = 256):
    """(ref, audio, text) for every row, read in batches (audio bytes can be large)."""
    for batch in ds.select_columns([REF, AUDIO, TEXT]).iter(batch_size=batch_size):
        yield from zip(batch[REF], batch[AUDIO], batch[TEXT])


def _split_key(ds) -> str:
    """Hash of the selected rows: their text, audio reference and, for files, size + mtime."""
    h = hashlib.sha256()
    for ref, audio, text in _rows(ds):
        if isinstance(audio, dict):
            if audio.get("bytes"):
                h.update(hashlib.sha256(audio["bytes"]).digest())
            audio = audio.get("path") or ""
        try:
            st = os.stat(audio) if audio else None
            stamp = f"{st.st_size}:{st.st_mtime_ns}" if st else "-"
        except OSError:
            stamp = "missing"
        h.update(f"{ref}\x00{audio}\x00{stamp}\x00{text}\x01".encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def processor_key(processor) -> str:
    h = hashlib.sha256(processor.feature_extractor.to_json_string().encode())
    tok = processor.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)).encode())
    h.update(repr(tok.prefix_tokens).encode())  # language / task / timestamps prefix
    return h.hexdigest()


def cache_key(train, ev, processor, cfg, max_label_tokens: int) -> str:
    d, w = cfg.data, cfg.whisper
    relevant = {
        "v": CACHE_VERSION,
        "train": _split_key(train),
        "eval": _split_key(ev) if ev is not None else None,
        "processor": processor_key(processor),
        "opts": [d.max_audio_seconds, d.skip_bad_rows, w.language, w.task, w.timestamps, w.trim_audio, max_label_tokens],
    }
    if d.features != "log_mel":  # (keys of log-mel caches built before this option stay valid)
        relevant["features"] = d.features
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:24]


def default_cache_dir() -> Path:
    from loratune.core.names import cache_root

    return cache_root() / "features"


def set_prefix_tokens(tokenizer, whisper_cfg) -> None:
    tokenizer.set_prefix_tokens(language=whisper_cfg.language, task=whisper_cfg.task, predict_timestamps=whisper_cfg.timestamps)


STALE_BUILD_SECONDS = 6 * 3600


def clean_stale_builds(root: Path, max_age: float = STALE_BUILD_SECONDS) -> int:
    """Remove temp folders (``.<key>.*``) of cache builds that were killed: none has been touched for
    ``max_age`` seconds (a live build writes its Arrow files continuously). Returns how many went."""
    import time

    gone = 0
    for tmp in root.glob(".*"):
        try:
            idle = time.time() - max(p.stat().st_mtime for p in [tmp, *tmp.rglob("*")])
        except (OSError, ValueError):
            continue
        if tmp.is_dir() and idle > max_age:
            shutil.rmtree(tmp, ignore_errors=True)
            gone += 1
    if gone:
        log.info("removed %d temp folder(s) of killed feature-cache builds in %s", gone, root)
    return gone


def prepare_asr_data(cfg, processor, max_label_tokens: int = 448) -> ASRData:
    """Load, split, validate and featurise (or reuse the cache); see the module docstring."""
    from datasets import Dataset

    data = cfg.data
    set_prefix_tokens(processor.tokenizer, cfg.whisper)
    train_raw, eval_raw = load_raw_splits(data)
    key = cache_key(train_raw, eval_raw, processor, cfg, max_label_tokens)
    root = Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()
    target = root / key
    meta_path = target / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        log.info("feature cache hit: %s (%d train / %s eval examples; no re-processing)", target, meta["train_rows"], meta["eval_rows"])
        train = Dataset.from_file(str(target / "train.arrow"))
        ev = Dataset.from_file(str(target / "eval.arrow")) if (target / "eval.arrow").is_file() else None
        _report_skips(meta)
        return ASRData(train, ev, {**meta, "cache_hit": True, "cache_dir": str(target)})

    checker = _Checker(data, data.skip_bad_rows)
    # all cheap checks of both splits before any audio is decoded
    ids = {name: _tokenise_and_precheck(ds, processor.tokenizer, checker, max_label_tokens)
           for name, ds in (("train", train_raw), ("eval", eval_raw)) if ds is not None}
    root.mkdir(parents=True, exist_ok=True)
    clean_stale_builds(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    try:
        counts = {}
        for name, ds in (("train", train_raw), ("eval", eval_raw)):
            if ds is None:
                continue
            log.info("extracting %s of %d %s rows (once; cached under %s)", data.features, len(ds), name, target)
            audio_only = data.features == "audio"
            counts[name] = _features(ds, ids[name], processor.feature_extractor, checker, cfg.whisper.trim_audio,
                                     tmp / f"{name}.arrow", num_proc=data.num_proc, audio_only=audio_only,
                                     desc=f"{'decoded audio' if audio_only else 'log-mel features'} ({name})")
        if counts["train"] == 0:
            raise DataError(f"no usable training rows left after validation ({_skip_text(checker.skipped)}); fix the data or the split options")
        meta = {
            "train_rows": counts["train"], "eval_rows": counts.get("eval", 0),
            "rows_read": len(train_raw) + (len(eval_raw) if eval_raw is not None else 0),
            "skipped": dict(checker.skipped), "skipped_examples": checker.first, "trim_audio": cfg.whisper.trim_audio,
        }
        if eval_raw is not None and counts.get("eval", 0) == 0:
            (tmp / "eval.arrow").unlink()
        (tmp / "meta.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
        try:
            os.replace(tmp, target)
        except OSError:  # a concurrent run (another rank) finished first; its copy is equivalent
            if not (target / "meta.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _report_skips(meta)
    train = Dataset.from_file(str(target / "train.arrow"))
    ev = Dataset.from_file(str(target / "eval.arrow")) if (target / "eval.arrow").is_file() else None
    return ASRData(train, ev, {**meta, "cache_hit": False, "cache_dir": str(target)})


def _skip_text(skipped: Dict[str, int]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())) or "none skipped"


def _report_skips(meta: Dict[str, Any]) -> None:
    total = sum(meta["skipped"].values())
    if total:
        log.warning("skipped %d bad rows of %d (%s); first of each: %s", total, meta["rows_read"], _skip_text(meta["skipped"]),
                    " | ".join(meta["skipped_examples"].values()))
