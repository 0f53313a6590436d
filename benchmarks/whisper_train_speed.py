"""Whisper LoRA training speed: the tutorial recipes against loratune's fast settings, one process.

    python benchmarks/whisper_train_speed.py                    # everything (needs a CUDA GPU)
    python benchmarks/whisper_train_speed.py --only turbo,short # a subset: turbo, short, large-v2
    python benchmarks/whisper_train_speed.py --tiny --steps 2   # CPU rehearsal on a tiny architecture

Full-size architectures (large-v3-turbo, large-v2) are built from ``WhisperConfig`` with random
weights (speed and memory do not depend on the values), saved once and loaded back through
``from_pretrained`` with the recipe's bitsandbytes config, then wrapped by loratune's own
``attach_lora``, i.e. the code path ``loratune train`` takes. Every variant is a recipe YAML
plus ``key=value`` overrides, so a row's settings can be pasted onto the command line.
Inputs: synthetic log-mels (30 s, or HSK-like 0.7-3.4 s clips for the short-clip rows), 24-token
labels. A step is forward + backward + clip-grad + AdamW, the work of one Trainer step.
Reported: median seconds per step over ``--steps`` after ``--warmup``, samples/s, peak memory.
"""
from __future__ import annotations

import itertools
import time

import _common as C
import numpy as np
import torch

# HSK-zh clip durations (s), percentiles 0/10/25/50/75/90/99/100 of 300 random clips (av headers).
HSK_PCT = ([0, 10, 25, 50, 75, 90, 99, 100], [0.73, 1.21, 1.41, 1.61, 1.97, 2.17, 2.97, 3.37])

ARCH = {
    "large-v3-turbo": dict(vocab_size=51866, num_mel_bins=128, encoder_layers=32, decoder_layers=4, dtype=torch.float16),
    "large-v2": dict(vocab_size=51865, num_mel_bins=80, encoder_layers=32, decoder_layers=32, dtype=torch.float32),
}
TURBO = "whisper-large-v3-turbo-zh-qlora.yaml"
V2 = "whisper-large-v2-zh-int8-lora.yaml"
# The recipes ship loratune's fast settings; these overrides give back the tutorials' own settings,
# the baseline every other row starts from (rows then change one thing at a time, see `extra`).
TUTORIAL_TURBO = ["quant.compute_dtype=float16", "train.bf16=false", "train.batch_size=4", "train.dequantize_base=false",
                  "train.frozen_dtype=null", "train.compile_layers=false", "model.sdpa_backend=null"]
TUTORIAL_V2 = ["train.bf16=false", "train.fp16=true", "train.batch_size=4", "train.grad_accum=4", "train.dequantize_base=false",
               "train.frozen_dtype=null", "train.compile_layers=false", "model.sdpa_backend=null"]
FAST_TURBO = ["quant.compute_dtype=bfloat16", "train.bf16=true"]
FAST_V2 = ["train.fp16=false", "train.bf16=true"]

# (group, row name, recipe yaml, overrides, extra) -- extra: frozen_bf16 (cast_frozen after attach_lora),
# pure_bf16 (frozen bf16 and no autocast: bf16 activations, fp32 LoRA weights), dequant
# (speed.dequantize_frozen), clips ("full"/"hsk"), int8_threshold
_VARIANTS = [
    ("turbo", "recipe: 4-bit, fp16 compute, no autocast, bs 4", TURBO, [], {}),
    ("turbo", "bf16 autocast, bs 4", TURBO, FAST_TURBO, {}),
    ("turbo", "bf16 autocast, bs 16", TURBO, FAST_TURBO + ["train.batch_size=16"], {}),
    ("turbo", "bf16 + frozen bf16, bs 16", TURBO, FAST_TURBO + ["train.batch_size=16"], {"frozen_bf16": True}),
    ("turbo", "bf16 + frozen bf16, bs 32", TURBO, FAST_TURBO + ["train.batch_size=32"], {"frozen_bf16": True}),
    ("turbo", "bf16 + frozen bf16, bs 32, ckpt", TURBO, FAST_TURBO + ["train.batch_size=32", "train.gradient_checkpointing=true"], {"frozen_bf16": True}),
    ("turbo", "pure bf16 (no autocast), bs 16", TURBO, FAST_TURBO + ["train.batch_size=16"], {"pure_bf16": True}),
    ("turbo", "NF4 dequantised to bf16, autocast, bs 16", TURBO, FAST_TURBO + ["train.batch_size=16"], {"frozen_bf16": True, "dequant": True}),
    ("turbo", "NF4 dequantised, pure bf16, bs 16", TURBO, FAST_TURBO + ["train.batch_size=16"], {"pure_bf16": True, "dequant": True}),
    ("turbo", "NF4 dequantised, pure bf16, bs 8", TURBO, FAST_TURBO + ["train.batch_size=8"], {"pure_bf16": True, "dequant": True}),
    ("turbo", "NF4 dequantised, pure bf16, bs 32, ckpt", TURBO, FAST_TURBO + ["train.batch_size=32", "train.gradient_checkpointing=true"], {"pure_bf16": True, "dequant": True}),
    ("turbo", "NF4 dequantised, autocast, bs 12", TURBO, FAST_TURBO + ["train.batch_size=12"], {"frozen_bf16": True, "dequant": True}),
    ("turbo", "NF4 dequantised, autocast, bs 16, cuDNN attention", TURBO, FAST_TURBO + ["train.batch_size=16"], {"frozen_bf16": True, "dequant": True, "sdpa": "cudnn"}),
    ("turbo", "NF4 dequantised, autocast, bs 16, compiled layers", TURBO, FAST_TURBO + ["train.batch_size=16"], {"frozen_bf16": True, "dequant": True, "compile_layers": True}),
    ("turbo", "NF4 dequantised, autocast, bs 12, compiled layers", TURBO, FAST_TURBO + ["train.batch_size=12"], {"frozen_bf16": True, "dequant": True, "compile_layers": True}),
    ("turbo", "NF4 dequantised, autocast, bs 8, compiled layers", TURBO, FAST_TURBO + ["train.batch_size=8"], {"frozen_bf16": True, "dequant": True, "compile_layers": True}),
    ("turbo", "NF4 dequantised, autocast, bs 32, ckpt, compiled layers", TURBO, FAST_TURBO + ["train.batch_size=32", "train.gradient_checkpointing=true"], {"frozen_bf16": True, "dequant": True, "compile_layers": True}),
    ("turbo", "NF4 dequantised, autocast, bs 16, half ckpt, compiled layers", TURBO, FAST_TURBO + ["train.batch_size=16", "train.gradient_checkpointing=true", "train.checkpoint_fraction=0.5"], {"frozen_bf16": True, "dequant": True, "compile_layers": True}),
    ("turbo", "NF4 dequantised, autocast, bs 10, compiled layers", TURBO, FAST_TURBO + ["train.batch_size=10"], {"frozen_bf16": True, "dequant": True, "compile_layers": True}),
    ("turbo", "NF4 dequantised, autocast, bs 16, compiled layers, memory budget 0.5", TURBO, FAST_TURBO + ["train.batch_size=16"], {"frozen_bf16": True, "dequant": True, "compile_layers": True, "mem_budget": 0.5}),
    ("turbo", "NF4 dequantised, autocast, bs 12, compiled layers, memory budget 0.7", TURBO, FAST_TURBO + ["train.batch_size=12"], {"frozen_bf16": True, "dequant": True, "compile_layers": True, "mem_budget": 0.7}),
    ("turbo", "NF4 dequantised, autocast, bs 8, compiled layers, cuDNN attention", TURBO, FAST_TURBO + ["train.batch_size=8"], {"frozen_bf16": True, "dequant": True, "compile_layers": True, "sdpa": "cudnn"}),
    ("turbo", "NF4 dequantised, autocast, bs 10, compiled layers, cuDNN attention, memory budget 0.8", TURBO, FAST_TURBO + ["train.batch_size=10"], {"frozen_bf16": True, "dequant": True, "compile_layers": True, "sdpa": "cudnn", "mem_budget": 0.8}),
    ("turbo", "NF4 dequantised, autocast, bs 12, compiled layers, cuDNN attention, memory budget 0.7", TURBO, FAST_TURBO + ["train.batch_size=12"], {"frozen_bf16": True, "dequant": True, "compile_layers": True, "sdpa": "cudnn", "mem_budget": 0.7}),
    ("turbo", "NF4 dequantised, autocast, bs 12, compiled layers, cuDNN attention, memory budget 0.6", TURBO, FAST_TURBO + ["train.batch_size=12"], {"frozen_bf16": True, "dequant": True, "compile_layers": True, "sdpa": "cudnn", "mem_budget": 0.6}),
    ("turbo", "NF4 dequantised, autocast, bs 16, compiled layers, cuDNN attention, memory budget 0.5", TURBO, FAST_TURBO + ["train.batch_size=16"], {"frozen_bf16": True, "dequant": True, "compile_layers": True, "sdpa": "cudnn", "mem_budget": 0.5}),
    ("turbo", "NF4 dequantised, autocast, bs 12, compiled layers, cuDNN attention, memory budget 0.8", TURBO, FAST_TURBO + ["train.batch_size=12"], {"frozen_bf16": True, "dequant": True, "compile_layers": True, "sdpa": "cudnn", "mem_budget": 0.8}),
    ("turbo", "NF4 dequantised, autocast, bs 9, compiled layers, cuDNN attention", TURBO, FAST_TURBO + ["train.batch_size=9"], {"frozen_bf16": True, "dequant": True, "compile_layers": True, "sdpa": "cudnn"}),
    ("turbo", "4-bit kept, bf16 autocast, bs 16, compiled layers", TURBO, FAST_TURBO + ["train.batch_size=16"], {"frozen_bf16": True, "compile_layers": True}),
    ("short", "padded 30 s, bf16 + frozen bf16, bs 16", TURBO, FAST_TURBO + ["train.batch_size=16"], {"frozen_bf16": True}),
    ("short", "trimmed, bf16 + frozen bf16, bs 16", TURBO, FAST_TURBO + ["train.batch_size=16", "whisper.trim_audio=true"], {"frozen_bf16": True, "clips": "hsk"}),
    ("short", "trimmed, bf16 + frozen bf16, bs 64", TURBO, FAST_TURBO + ["train.batch_size=64", "whisper.trim_audio=true"], {"frozen_bf16": True, "clips": "hsk"}),
    ("large-v2", "recipe: 8-bit, fp16 autocast, ckpt, bs 4", V2, [], {}),
    ("large-v2", "bf16 autocast, ckpt, bs 16", V2, FAST_V2 + ["train.batch_size=16"], {}),
    ("large-v2", "bf16 + frozen bf16, ckpt, bs 16", V2, FAST_V2 + ["train.batch_size=16"], {"frozen_bf16": True}),
    ("large-v2", "bf16 + frozen bf16, bs 8, no ckpt", V2, FAST_V2 + ["train.batch_size=8", "train.gradient_checkpointing=false"], {"frozen_bf16": True}),
    ("large-v2", "pure bf16 (int8 kept), ckpt, bs 16", V2, FAST_V2 + ["train.batch_size=16"], {"pure_bf16": True}),
    ("large-v2", "int8 dequantised, pure bf16, ckpt, bs 8", V2, FAST_V2 + ["train.batch_size=8"], {"pure_bf16": True, "dequant": True}),
    ("large-v2", "int8 dequantised, pure bf16, ckpt, bs 16", V2, FAST_V2 + ["train.batch_size=16"], {"pure_bf16": True, "dequant": True}),
    ("large-v2", "bf16 + frozen bf16, ckpt, bs 16, int8 threshold 0", V2, FAST_V2 + ["train.batch_size=16"], {"frozen_bf16": True, "int8_threshold": 0.0}),
    ("turbo", "shipped recipe (configs/whisper-large-v3-turbo-zh-qlora.yaml as is)", TURBO, [], {"shipped": True}),
    ("turbo", "shipped recipe without CUDA graphs", TURBO, ["train.cuda_graphs=false"], {"shipped": True}),
    ("turbo", "shipped recipe, bs 9", TURBO, ["train.batch_size=9"], {"shipped": True}),
    ("turbo", "shipped recipe + coordinate-descent tuning of the compiled kernels", TURBO, [], {"shipped": True, "inductor": {"coordinate_descent_tuning": True}}),
    ("turbo", "shipped recipe, LoRA dropout 0 (diagnostic: the cost of dropout's random numbers)", TURBO, ["lora.dropout=0"], {"shipped": True}),
    ("turbo", "shipped recipe + fused AdamW", TURBO, ["train.optim=adamw_torch_fused"], {"shipped": True, "fused_adamw": True}),
    ("turbo", "shipped recipe + LoRA inputs kept bf16", TURBO, [], {"shipped": True, "no_input_cast": True}),
    ("turbo", "shipped recipe + CUDA graphs of the compiled layers", TURBO, [], {"shipped": True, "compile_mode": "reduce-overhead"}),
    ("turbo", "shipped recipe + whole encoder compiled", TURBO, [], {"shipped": True, "compile_mode": "encoder"}),
    ("large-v2", "shipped recipe (configs/whisper-large-v2-zh-int8-lora.yaml as is)", V2, [], {"shipped": True}),
]


VARIANTS = [
    (g, name, recipe, ov if extra.get("shipped") else (TUTORIAL_TURBO if recipe == TURBO else TUTORIAL_V2) + ov, extra)
    for g, name, recipe, ov, extra in _VARIANTS
]


def whisper_config(arch: str, tiny: bool):
    from transformers import WhisperConfig

    a = dict(ARCH[arch])
    a.pop("dtype")
    dims = dict(d_model=1280, encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120)
    if tiny:
        dims = dict(d_model=64, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)
        a.update(encoder_layers=2, decoder_layers=2)
    return WhisperConfig(
        **a, **dims, max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50258,
        pad_token_id=50257, bos_token_id=50257, eos_token_id=50257, begin_suppress_tokens=[220, 50257],
    )


def model_path(arch: str, tiny: bool):
    from transformers import WhisperForConditionalGeneration

    name = f"whisper-{arch}{'-tiny' if tiny else ''}"
    return C.save_random(WhisperForConditionalGeneration, whisper_config(arch, tiny), name, ARCH[arch]["dtype"])


def hsk_batches(n_clips: int, batch: int, seed: int = 0):
    """Frame counts of length-grouped batches of HSK-like clips (what group_by_length produces)."""
    from loratune.asr.trim import trimmed_num_frames

    rng = np.random.default_rng(seed)
    secs = np.sort(np.interp(rng.uniform(0, 100, n_clips), *HSK_PCT))
    frames = [trimmed_num_frames(int(s * 16000)) for s in secs]
    return [max(frames[i : i + batch]) for i in range(0, n_clips, batch)]


def build(path, cfg, extra):
    """Load + quantise + LoRA exactly like loratune train (asr/model.py + adapters.attach_lora)."""
    from transformers import WhisperForConditionalGeneration

    from loratune.asr.model import model_dtype
    from loratune.asr.speed import apply_training_speed
    from loratune.core.adapters import attach_lora, bnb_config
    from loratune.core.speed import cast_frozen, dequantize_frozen

    kwargs = dict(dtype=model_dtype(cfg), attn_implementation=cfg.model.attn_implementation)
    quant = bnb_config(cfg.quant)
    if quant is not None:
        if "int8_threshold" in extra:
            quant.llm_int8_threshold = extra["int8_threshold"]
        kwargs.update(quantization_config=quant, device_map={"": 0} if torch.cuda.is_available() else None)
    model = WhisperForConditionalGeneration.from_pretrained(path, **kwargs)
    if quant is None:
        model.to(C.device())
    model.config.use_cache = False
    # task_type None: PeftModelForSeq2SeqLM passes input_ids=None, which Whisper forwards twice (TypeError)
    model = attach_lora(model, cfg, task_type=None)
    if extra.get("compile_mode"):  # compiled below, in the row's own way
        cfg.train.compile_layers = False
    apply_training_speed(model, cfg)  # the train.* speed options of the row's overrides, as loratune train does
    if extra.get("dequant"):
        dequantize_frozen(model, torch.bfloat16)
    if extra.get("frozen_bf16") or extra.get("pure_bf16"):
        cast_frozen(model, torch.bfloat16)
    if cfg.whisper.trim_audio:
        from loratune.asr.trim import enable_encoder_trimming

        enable_encoder_trimming(model)
    if extra.get("no_input_cast"):  # PEFT casts a LoRA input to the fp32 adapter dtype; autocast casts it back
        for m in model.modules():
            if hasattr(m, "cast_input_dtype_enabled"):
                m.cast_input_dtype_enabled = False
    if extra.get("compile_mode") == "encoder":
        base = model.get_base_model()
        base.model.encoder.compile()
        for layer in base.model.decoder.layers:
            layer.compile()
    elif extra.get("compile_mode"):
        from loratune.core.speed import checkpointing_layers

        for layer in checkpointing_layers(model):
            layer.compile(mode=extra["compile_mode"])
    if extra.get("compile_layers"):  # what train.compile_layers does, for rows that vary it by hand
        from loratune.core.speed import compile_layers

        # selective recomputation chosen by the compiler's partitioner: 1.0 = save what is cheapest in
        # time (the default), lower = recompute more to save activation memory
        torch._functorch.config.activation_memory_budget = extra.get("mem_budget", 1.0)
        compile_layers(model)
    return model


def run_variant(group, name, recipe, overrides, extra, args):
    from loratune.config import load_config

    arch = "large-v2" if recipe == V2 else "large-v3-turbo"
    path = model_path(arch, args.tiny)
    tiny = ["train.batch_size=2"] if args.tiny else []  # rehearsal: the code path, not the numbers
    cfg = load_config(C.REPO / "configs" / recipe, overrides + tiny + [f"model.name={path}", "train.report_to=[none]"])
    if args.loss_curve:  # deterministic: no LoRA dropout, same adapter initialisation in every row
        cfg.lora.dropout = 0.0
        torch.manual_seed(0)
    bs = cfg.train.batch_size
    row = dict(group=group, variant=name, batch=bs, overrides=" ".join(overrides) or "(recipe as is)")
    C.reset_memory()
    C.reset_sdpa()
    torch._dynamo.reset()  # fresh compiled graphs per row (no recompile limit, nothing reused across rows)
    import torch._inductor.config as inductor_config

    tuned = {k: getattr(inductor_config, k) for k in extra.get("inductor", {})}
    for k, v in extra.get("inductor", {}).items():  # restored after the row's first steps compiled
        setattr(inductor_config, k, v)
    model = build(path, cfg, extra)
    model.train()
    dev = C.device()
    n_mels = model.config.num_mel_bins
    feat_dtype = torch.float32
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, fused=bool(extra.get("fused_adamw")) or None)
    amp = torch.bfloat16 if cfg.train.bf16 else torch.float16 if cfg.train.fp16 else None
    if not torch.cuda.is_available() or extra.get("pure_bf16"):
        amp = None  # the Trainer ignores fp16/bf16 on the CPU too; pure bf16 needs no autocast
    scaler = torch.amp.GradScaler() if amp == torch.float16 else None
    if amp is None:
        feat_dtype = model.get_base_model().model.encoder.conv1.weight.dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    frames_list = hsk_batches(bs * args.hsk_batches, bs) if extra.get("clips") == "hsk" else [3000, 3000]
    batches = [
        (
            (0.5 * torch.randn(bs, n_mels, f, generator=g)).to(dev, feat_dtype),
            torch.randint(0, 50000, (bs, 24), generator=g).to(dev),
        )
        for f in frames_list
    ]
    cycle = itertools.cycle(batches)

    def step():
        if extra.get("compile_mode") == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new training step: earlier replays' outputs are free
        feats, labels = next(cycle)
        with C.autocast(amp), C.sdpa_backend(extra.get("sdpa")):
            loss = model(input_features=feats, labels=labels).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm)
            opt.step()
        opt.zero_grad(set_to_none=True)
        row["loss"] = loss.detach()  # a tensor: reading it here would synchronise every step

    if tuned:
        try:
            step()  # compile (with the row's Inductor settings) before timing
        finally:
            for k, v in tuned.items():
                setattr(inductor_config, k, v)
    if args.loss_curve:  # the loss of each of the first N steps, read after the step (no timing)
        curve = []
        for _ in range(args.loss_curve):
            step()
            curve.append(float(row["loss"]))
        row.update(loss_curve=curve, loss=curve[-1])
        del model, opt, batches, cycle, params
        C.reset_memory()
        return row
    if extra.get("clips") == "hsk":  # one warm-up pass over every shape, then one timed pass
        C.time_steps(step, len(batches), 0)
        t0 = time.perf_counter()
        for _ in batches:
            step()
        C.sync()
        total = time.perf_counter() - t0
        row.update(step_s=total / len(batches), samples_s=bs * len(batches) / total, frames=f"{min(frames_list)}-{max(frames_list)}")
    else:
        times = C.time_steps(step, args.warmup, args.steps, args.pipelined)
        row.update(step_s=C.median(times), samples_s=bs / C.median(times), frames=3000)
    row.update(peak_gib=C.peak_gib(), reserved_gib=C.peak_reserved_gib(), pipelined=args.pipelined)
    if args.launch and torch.cuda.is_available():
        row.update(C.launch_check(step))
    if args.profile and torch.cuda.is_available():
        row["profile"] = C.profile(step)
    row["loss"] = float(row["loss"])
    del model, opt, batches, cycle, params
    C.reset_memory()
    return row


def main():
    ap = C.bench_parser(__doc__)
    ap.add_argument("--only", default="turbo,short,large-v2", help="comma-separated groups")
    ap.add_argument("--loss-curve", type=int, default=0, metavar="N",
                    help="no timing: the first N losses of each row (LoRA dropout 0, same seed), max difference to the first row")
    ap.add_argument("--hsk-batches", type=int, default=8, help="length-grouped batches in a short-clip pass")
    args = ap.parse_args()
    info = C.start(args)
    groups = args.only.split(",")
    variants = [v for v in VARIANTS if v[0] in groups]
    rows = C.run_rows(variants, lambda v: v[1], lambda v: run_variant(*v, args), "whisper_train_speed.json", info, args,
                      lambda v: dict(group=v[0], variant=v[1], overrides=" ".join(v[3])))
    for group in groups:
        sub = [r for r in rows if r["group"] == group]
        if sub and args.loss_curve:
            ref = next((r["loss_curve"] for r in sub if r.get("loss_curve")), [])
            for r in sub:
                curve = r.get("loss_curve") or []
                if ref and len(curve) == len(ref):
                    r["max_abs_diff"] = f"{max(abs(a - b) for a, b in zip(curve, ref)):.1e}"
                    r["first_last"] = f"{curve[0]:.4f} -> {curve[-1]:.4f}"
            C.print_table(f"loss curves, {group}, {args.loss_curve} steps, vs first row that ran", sub, ["variant", "first_last", "max_abs_diff", "error"])
            continue
        if sub:
            C.add_ratio(sub, "samples_s", sub[0].get("samples_s"), "x_first_row")
            C.print_table(f"whisper training, {group} ({info['device']})", sub,
                          ["variant", "batch", "frames", "samples_s", "x_first_row", "peak_gib", "reserved_gib", "step_s", "loss", "error"])


if __name__ == "__main__":
    main()
