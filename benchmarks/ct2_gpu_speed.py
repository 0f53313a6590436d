"""GPU transcription speed: CTranslate2 (loratune's ``transcribe.backend=ctranslate2``) against the
transformers fast path, large-v3-turbo, 30-s clips, in one process on one card.

    python benchmarks/ct2_gpu_speed.py                       # needs a CUDA GPU and ctranslate2's CUDA 12 libraries
    python benchmarks/ct2_gpu_speed.py --tiny --reps 1       # CPU rehearsal on a tiny architecture

The model is the large-v3-turbo architecture with random weights (as ``whisper_generate_speed.py``
builds it), converted by loratune's own ``export_ctranslate2`` (the converter the ctranslate2
backend runs). Every row decodes exactly ``--new-tokens`` tokens per clip from the same synthetic
log-mels: transformers gets ``min_new_tokens = max_new_tokens``; CTranslate2 gets the end-of-text
token suppressed and ``max_length`` set so that every sequence has that many tokens (checked).
Rows: the transformers baselines of ``whisper_generate_speed.py`` (HF default fp16 bs 32, and
loratune's fastest: bf16, static cache, compiled encoder, cuDNN attention) and CTranslate2
float16 / int8_float16 / bfloat16 at several batch sizes. clips/s = batch / median batch time
(features already on the GPU for both); encoder ms/clip from ``Whisper.encode`` alone.
"""
from __future__ import annotations

import shutil
import time

import _common as C
import torch
from whisper_generate_speed import VARIANTS, run_variant
from whisper_train_speed import model_path

PROMPT = [50258, 50260, 50360, 50364]  # <|startoftranscript|><|zh|><|transcribe|><|notimestamps|>
EOT = 50257


def ct2_dir(hf_path, processor_dir, quantization: str):
    """loratune's export of the random checkpoint (tokenizer files from ``processor_dir``)."""
    from loratune.export import export_ctranslate2

    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        src = processor_dir / name
        if src.is_file() and not (hf_path / name).is_file():
            shutil.copyfile(src, hf_path / name)
    out = C.scratch_dir() / f"{hf_path.name}-ct2-{quantization}"
    if not (out / "model.bin").is_file():
        export_ctranslate2(hf_path, out, quantization)
    return out


def run_ct2(path, compute_type: str, bs: int, args, flash: bool = False):
    import ctranslate2

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ctranslate2.models.Whisper(str(path), device=device, compute_type=compute_type, flash_attention=flash)
    g = torch.Generator().manual_seed(0)
    feats = [(0.5 * torch.randn(bs, model.n_mels, 3000, generator=g)).to(C.device()).contiguous() for _ in range(2)]
    views = [ctranslate2.StorageView.from_array(f if f.is_cuda else f.numpy()) for f in feats]  # on the GPU already (CUDA array interface)
    prompts = [PROMPT] * bs
    max_length = len(PROMPT) + args.new_tokens

    def one(v):
        res = model.generate(v, prompts, beam_size=1, max_length=max_length, suppress_tokens=[-1, EOT], suppress_blank=False)
        return [len(r.sequences_ids[0]) for r in res]

    t0 = time.perf_counter()
    lens = one(views[0])
    for _ in range(8):  # calibrate max_length so that every clip decodes exactly --new-tokens tokens
        if min(lens) == max(lens) == args.new_tokens:
            break
        step = round(max_length * args.new_tokens / max(max(lens), 1)) - max_length  # proportional, then +-1
        max_length += step if step else (1 if max(lens) < args.new_tokens else -1)
        lens = one(views[0])
    one(views[1])
    C.sync()
    row = dict(variant=f"ctranslate2 {compute_type}, bs {bs}{', flash attention' if flash else ''}", batch=bs, dtype=compute_type, warmup_s=time.perf_counter() - t0)
    times = []
    for i in range(args.reps):
        t = time.perf_counter()
        lens = one(views[i % 2])
        C.sync()
        times.append(time.perf_counter() - t)
    row["clips_s"] = bs / C.median(times)
    row["rtf"] = 1.0 / (row["clips_s"] * 30.0)
    enc = []
    for i in range(args.reps):
        t = time.perf_counter()
        model.encode(views[i % 2], to_cpu=False)
        C.sync()
        enc.append(time.perf_counter() - t)
    row["encoder_ms_per_clip"] = 1e3 * C.median(enc) / bs
    row["tokens_out"] = f"{min(lens)}-{max(lens)}"
    row["max_length"] = max_length
    model = views = feats = None  # free the GPU before the next row (the closure holds the same cells)
    C.reset_memory()
    return row


def main():
    ap = C.bench_parser(__doc__)
    ap.add_argument("--reps", type=int, default=5, help="timed batches per row")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hsk-batches", type=int, default=4)
    ap.add_argument("--batches", default="32,64,128", help="CTranslate2 batch sizes")
    ap.add_argument("--compute-types", default="float16,int8_float16,bfloat16")
    ap.add_argument("--flash", default="off", help="CTranslate2 flash_attention: off, on or both")
    ap.add_argument("--processor", default=".mg/e2e", help="folder with the turbo tokenizer/processor files")
    ap.add_argument("--hf-rows", default="HF default: fp16, bs 32;bf16, bs 128, static cache + compiled encoder, cuDNN attention",
                    help="';'-separated exact names of whisper_generate_speed rows to run as baselines ('' for none)")
    args = ap.parse_args()
    info = C.start(args)
    import ctranslate2

    info["ctranslate2"] = ctranslate2.__version__
    hf_path = model_path("large-v3-turbo", args.tiny)
    variants = [("hf", v) for v in VARIANTS if v[0] in [n for n in args.hf_rows.split(";") if n]]
    cts = args.compute_types.split(",") if torch.cuda.is_available() else ["float32", "int8"]
    flashes = {"off": [False], "on": [True], "both": [False, True]}[args.flash]
    variants += [("ct2", (ct, int(b), fl)) for ct in cts for b in args.batches.split(",") for fl in flashes]
    from pathlib import Path

    def run_one(v):
        kind, spec = v
        if kind == "hf":
            name, dtype, bs, clips, opts = spec
            return run_variant(name, dtype, min(bs, 4) if args.tiny else bs, clips, opts, args, hf_path)
        ct, bs, fl = spec
        return run_ct2(ct2_dir(hf_path, Path(args.processor), "float16"), ct, min(bs, 4) if args.tiny else bs, args, fl)

    def name_of(v):
        return v[1][0] if v[0] == "hf" else f"ctranslate2 {v[1][0]}, bs {v[1][1]}{', flash attention' if v[1][2] else ''}"

    rows = C.run_rows(variants, name_of, run_one, "ct2_gpu_speed.json", info, args, lambda v: dict(variant=name_of(v)))
    C.add_ratio(rows, "clips_s", rows[0].get("clips_s") if rows else None, "x_first_row")
    C.print_table(f"whisper-large-v3-turbo, 30-s clips, {args.new_tokens} new tokens ({info['device']})", rows,
                  ["variant", "batch", "clips_s", "x_first_row", "encoder_ms_per_clip", "rtf", "peak_gib", "warmup_s", "tokens_out", "error"])


if __name__ == "__main__":
    main()
