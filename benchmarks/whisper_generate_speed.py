"""Whisper batched transcription speed: transformers' default generate against loratune's fast path.

    python benchmarks/whisper_generate_speed.py                 # needs a CUDA GPU
    python benchmarks/whisper_generate_speed.py --tiny --reps 1 # CPU rehearsal on a tiny architecture

large-v3-turbo architecture with random weights (fp16 checkpoint, as published), synthetic
log-mels, exactly ``--new-tokens`` tokens per clip (``min_new_tokens`` = ``max_new_tokens``, so
random weights cannot stop early and every row decodes the same amount). Rows:

* 30-s clips: HF default (fp16, SDPA, batch 32, dynamic cache) vs bf16, larger batches, a static
  KV cache (transformers then compiles the decoder step with CUDA graphs), ``torch.compile`` of
  the encoder;
* HSK-like short clips (0.7-3.4 s): padded to 30 s vs trimmed (``whisper.trim_audio``),
  length-grouped batches; real-time factor = processing time / audio time.

Reported: clips/s (median batch time over ``--reps`` after a warm-up), RTF, peak memory.
"""
from __future__ import annotations

import time

import _common as C
import torch
from whisper_train_speed import hsk_batches, model_path

HSK_MEAN_S = 1.69  # mean duration of the HSK-like clip distribution (see whisper_train_speed.HSK_PCT)


def generation_config():
    from transformers import GenerationConfig

    return GenerationConfig(
        decoder_start_token_id=50258, bos_token_id=50257, eos_token_id=50257, pad_token_id=50257,
        no_timestamps_token_id=50364, is_multilingual=True, lang_to_id={"<|zh|>": 50260, "<|en|>": 50259},
        task_to_id={"transcribe": 50360, "translate": 50359}, max_length=448, begin_suppress_tokens=[220, 50257],
        suppress_tokens=[],
    )


class Fp8Linear(torch.nn.Module):
    """Probe of FP8 (e4m3) encoder matmuls for target 5: weights quantised per output channel once,
    activations per token at run time, ``torch._scaled_mm`` with row-wise scales, bf16 out. Without
    CUDA the same quantised values are multiplied in fp32 (what the FP8 tensor cores compute, up to
    summation order), so the accuracy cost can be measured on a CPU."""

    def __init__(self, lin: torch.nn.Linear):
        super().__init__()
        w = lin.weight.detach().float()
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 448.0  # e4m3's largest value
        self.register_buffer("wq", (w / scale).to(torch.float8_e4m3fn))
        self.register_buffer("w_scale", scale.t().contiguous())  # (1, out)
        self.bias = lin.bias

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        s = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
        xq = (x2.float() / s).to(torch.float8_e4m3fn)
        if x.is_cuda:
            y = torch._scaled_mm(xq, self.wq.t(), scale_a=s, scale_b=self.w_scale, bias=self.bias, out_dtype=x.dtype)
        else:
            y = ((xq.float() * s) @ (self.wq.float() * self.w_scale.t()).t() + self.bias.float()).to(x.dtype)
        return y.reshape(*x.shape[:-1], -1)


def fp8_encoder(model) -> int:
    n = 0
    for layer in model.model.encoder.layers:
        for parent in (layer.self_attn, layer):
            for name in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
                lin = getattr(parent, name, None)
                if isinstance(lin, torch.nn.Linear):
                    if lin.bias is None:  # k_proj has none; _scaled_mm wants one in the output dtype
                        lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device), requires_grad=False)
                    setattr(parent, name, Fp8Linear(lin))
                    n += 1
    return n


def load(path, dtype):
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.generation_config = generation_config()
    return model.to(C.device()).eval()


# (name, dtype, batch, clips, options) -- options: static, compile_encoder, trim
VARIANTS = [
    ("HF default: fp16, bs 32", torch.float16, 32, "full", {}),
    ("bf16, bs 32", torch.bfloat16, 32, "full", {}),
    ("bf16, bs 128", torch.bfloat16, 128, "full", {}),
    ("short clips padded to 30 s: bf16, bs 128", torch.bfloat16, 128, "hsk", {}),
    ("short clips trimmed: bf16, bs 128", torch.bfloat16, 128, "hsk", {"trim": True}),
    ("short clips trimmed: bf16, bs 256", torch.bfloat16, 256, "hsk", {"trim": True}),
    ("bf16, bs 128, static cache (compiled decoder)", torch.bfloat16, 128, "full", {"static": True}),
    ("bf16, bs 128, static cache + compiled encoder", torch.bfloat16, 128, "full", {"static": True, "compile_encoder": True}),
    ("bf16, bs 128, cuDNN attention", torch.bfloat16, 128, "full", {"sdpa": "cudnn"}),
    ("bf16, bs 128, static cache + compiled encoder, cuDNN attention", torch.bfloat16, 128, "full", {"static": True, "compile_encoder": True, "sdpa": "cudnn"}),
    ("bf16, bs 256, static cache + compiled encoder", torch.bfloat16, 256, "full", {"static": True, "compile_encoder": True}),
    ("FP8 encoder matmuls (probe), bs 128, static cache + compiled encoder, cuDNN attention", torch.bfloat16, 128, "full", {"static": True, "compile_encoder": True, "sdpa": "cudnn", "fp8": True}),
]


def run_variant(name, dtype, bs, clips, opts, args, path):
    if not torch.cuda.is_available():
        dtype = torch.float32
    C.reset_memory()
    model = load(path, dtype)
    if opts.get("trim"):
        from loratune.asr.trim import enable_encoder_trimming

        enable_encoder_trimming(model)
    if opts.get("fp8"):
        fp8_encoder(model)
    if opts.get("compile_encoder"):
        model.model.encoder = torch.compile(model.model.encoder)
    n_mels = model.config.num_mel_bins
    g = torch.Generator().manual_seed(0)
    if clips == "hsk":
        frames = hsk_batches(bs * args.hsk_batches, bs)
        if not opts.get("trim"):
            frames = [3000] * len(frames)
    else:
        frames = [3000] * 2
    batches = [(0.5 * torch.randn(bs, n_mels, f, generator=g)).to(C.device(), dtype) for f in frames]
    kw = dict(language="zh", task="transcribe", max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    if opts.get("static"):
        kw["cache_implementation"] = "static"
    out_len = []

    def one(feats):
        with torch.inference_mode(), C.sdpa_backend(opts.get("sdpa")):
            seq = model.generate(input_features=feats, **kw)
        out_len.append(seq.shape[-1])

    row = dict(variant=name, batch=bs, dtype=str(dtype).replace("torch.", ""))
    t0 = time.perf_counter()
    for f in batches[: 2 if clips == "full" else len(batches)]:
        one(f)  # warm-up: compilation, CUDA graphs, every shape once
    C.sync()
    row["warmup_s"] = time.perf_counter() - t0
    if clips == "full":
        times = []
        for i in range(args.reps):
            t = time.perf_counter()
            one(batches[i % 2])
            C.sync()
            times.append(time.perf_counter() - t)
        row["clips_s"] = bs / C.median(times)
        row["rtf"] = 1.0 / (row["clips_s"] * 30.0)
        enc_times = []  # the encoder's share of a batch (the rest is decoding)
        for i in range(args.reps):
            t = time.perf_counter()
            with torch.inference_mode(), C.sdpa_backend(opts.get("sdpa")):
                model.model.encoder(batches[i % 2])
            C.sync()
            enc_times.append(time.perf_counter() - t)
        row["encoder_ms_per_clip"] = 1e3 * C.median(enc_times) / bs
    else:
        t = time.perf_counter()
        for f in batches:
            one(f)
        C.sync()
        total = time.perf_counter() - t
        row["clips_s"] = bs * len(batches) / total
        row["rtf"] = total / (bs * len(batches) * HSK_MEAN_S)
        row["frames"] = f"{min(frames)}-{max(frames)}"
    row["tokens_out"] = max(out_len)
    row["peak_gib"] = C.peak_gib()
    del model, batches
    C.reset_memory()
    return row


def main():
    ap = C.bench_parser(__doc__)
    ap.add_argument("--reps", type=int, default=5, help="timed batches (30-s rows)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--hsk-batches", type=int, default=4)
    args = ap.parse_args()
    info = C.start(args)
    path = model_path("large-v3-turbo", args.tiny)

    def run_one(v):
        name, dtype, bs, clips, opts = v
        return run_variant(name, dtype, min(bs, 4) if args.tiny else bs, clips, opts, args, path)

    rows = C.run_rows(VARIANTS, lambda v: v[0], run_one, "whisper_generate_speed.json", info, args,
                      lambda v: dict(variant=v[0], batch=v[2]))
    C.add_ratio(rows, "clips_s", rows[0].get("clips_s") if rows else None, "x_hf_default")
    C.print_table(f"whisper-large-v3-turbo generate, {args.new_tokens} new tokens ({info['device']})", rows,
                  ["variant", "batch", "frames", "clips_s", "x_hf_default", "encoder_ms_per_clip", "rtf", "peak_gib", "warmup_s", "tokens_out", "error"])


if __name__ == "__main__":
    main()
