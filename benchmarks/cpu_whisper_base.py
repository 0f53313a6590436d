"""CPU speed of the embedded default (whisper-base QLoRA on HSK): padded 30 s vs short-clip mode.

    python benchmarks/cpu_whisper_base.py                 # ~5 min on 2 cores
    python benchmarks/cpu_whisper_base.py --steps 1 --reps 1

A whisper-base-sized model (d_model 512, 6+6 layers, 80 mels, multilingual vocabulary) with random
weights: speed does not depend on the values. Training rows follow
``configs/whisper-base-hsk-qlora.yaml`` (4-bit NF4 base, LoRA r8 q,v, batch 8, 2 threads) through
loratune's ``attach_lora``; HSK-like clip lengths (0.7-3.4 s), length-grouped batches, 24-token
labels. Transcription rows: greedy ``generate`` of exactly 16 tokens per clip, batch 8.
"""
from __future__ import annotations

import argparse
import itertools
import time

import _common as C
import torch
from whisper_train_speed import hsk_batches

RECIPE = "whisper-base-hsk-qlora.yaml"
HSK_MEAN_S = 1.69

TRAIN = [
    ("recipe padded to 30 s (trim_audio=false)", ["whisper.trim_audio=false"]),
    ("short-clip mode (shipped default: trim_audio=true)", []),
    ("short-clip mode, no quantisation (quant.bits=0)", ["quant.bits=0"]),
    ("short-clip mode, NF4 dequantised to fp32 (train.dequantize_base=true)", ["train.dequantize_base=true", "train.frozen_dtype=float32"]),
]
GENERATE = [("padded to 30 s", False), ("trimmed (short-clip mode)", True)]


def base_config():
    from transformers import WhisperConfig

    return WhisperConfig(
        vocab_size=51865, num_mel_bins=80, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
        decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, max_source_positions=1500,
        max_target_positions=448, decoder_start_token_id=50258, pad_token_id=50257, bos_token_id=50257,
        eos_token_id=50257, begin_suppress_tokens=[220, 50257],
    )


def model_path():
    from transformers import WhisperForConditionalGeneration

    return C.save_random(WhisperForConditionalGeneration, base_config(), "whisper-base-random", torch.float32)


def train_row(name, overrides, args, path):
    from whisper_train_speed import build

    from loratune.config import load_config

    cfg = load_config(C.REPO / "configs" / RECIPE, overrides + [f"model.name={path}", "train.report_to=[none]"])
    torch.set_num_threads(cfg.train.threads or 2)
    model = build(path, cfg, {})
    model.train()
    bs = cfg.train.batch_size
    frames = hsk_batches(bs * 4, bs, seed=1)
    if not cfg.whisper.trim_audio:
        frames = [3000] * len(frames)
    g = torch.Generator().manual_seed(0)
    batches = [(0.5 * torch.randn(bs, 80, f, generator=g), torch.randint(0, 50000, (bs, 24), generator=g)) for f in frames]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr)
    cycle = itertools.cycle(batches)

    def step():
        feats, labels = next(cycle)
        loss = model(input_features=feats, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = C.time_steps(step, args.warmup, args.steps)
    return dict(kind="train", variant=name, batch=bs, frames=f"{min(frames)}-{max(frames)}",
                s_per_step=C.median(times), clips_s=bs / C.median(times))


def generate_row(name, trim, args, path):
    from transformers import WhisperForConditionalGeneration
    from whisper_generate_speed import generation_config

    torch.set_num_threads(2)
    model = WhisperForConditionalGeneration.from_pretrained(path).eval()
    model.generation_config = generation_config()
    model.generation_config.lang_to_id = {"<|zh|>": 50260}
    model.generation_config.task_to_id = {"transcribe": 50359}
    model.generation_config.no_timestamps_token_id = 50363
    if trim:
        from loratune.asr.trim import enable_encoder_trimming

        enable_encoder_trimming(model)
    bs = 8
    frames = hsk_batches(bs * args.reps, bs, seed=2)
    if not trim:
        frames = [3000] * len(frames)
    g = torch.Generator().manual_seed(0)
    feats = [0.5 * torch.randn(bs, 80, f, generator=g) for f in frames]
    kw = dict(language="zh", task="transcribe", max_new_tokens=16, min_new_tokens=16)
    with torch.inference_mode():
        model.generate(input_features=feats[0], **kw)  # warm-up
        t0 = time.perf_counter()
        for f in feats:
            model.generate(input_features=f, **kw)
        total = time.perf_counter() - t0
    n = bs * len(feats)
    return dict(kind="transcribe", variant=name, batch=bs, frames=f"{min(frames)}-{max(frames)}",
                s_per_step=total / len(feats), clips_s=n / total, rtf=total / (n * HSK_MEAN_S))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3, help="timed generate batches")
    ap.add_argument("--json", default="cpu_whisper_base.json", help="file name of the JSON written to $OUT / outputs/bench")
    ap.add_argument("--rows", default="", help="comma-separated substrings: run only rows whose name has one")
    args = ap.parse_args()
    torch.set_num_threads(2)
    info = C.versions()
    print("versions:", info, flush=True)
    path = model_path()
    rows = []
    keep = lambda name: not args.rows or any(s in name for s in args.rows.split(","))  # noqa: E731
    for name, overrides in TRAIN:
        if not keep(name):
            continue
        rows.append(train_row(name, overrides, args, path))
        print(rows[-1], flush=True)
    for name, trim in GENERATE:
        if not keep(name):
            continue
        rows.append(generate_row(name, trim, args, path))
        print(rows[-1], flush=True)
    C.write_json(args.json, dict(versions=info, args=vars(args), rows=rows))
    for kind in ("train", "transcribe"):
        sub = [r for r in rows if r["kind"] == kind]
        if not sub:
            continue
        for r in sub:
            r["x_first_row"] = r["clips_s"] / sub[0]["clips_s"]
        C.print_table(f"whisper-base on the CPU, {kind} ({info['device']})", sub,
                      ["variant", "batch", "frames", "s_per_step", "clips_s", "x_first_row", "rtf"])


if __name__ == "__main__":
    main()
