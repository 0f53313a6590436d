"""Causal-LM QLoRA SFT speed (Phi-3-mini architecture): the tutorial recipe vs loratune's fast path.

    python benchmarks/llm_sft_speed.py                    # needs a CUDA GPU
    python benchmarks/llm_sft_speed.py --tiny --steps 2   # CPU rehearsal on a tiny architecture

Phi-3-mini-4k is built from ``Phi3Config`` with random weights (bf16, as published), saved once and
loaded back through ``from_pretrained`` with bitsandbytes 4-bit NF4 + double quantisation, then
``loratune.models.adapters.attach_lora`` (LoRA r8 on qkv_proj, o_proj, gate_up_proj, down_proj).
A step is forward + backward + clip-grad + AdamW on random token ids (labels = inputs).

* recipe: fp32 compute, no autocast (``prepare_model_for_kbit_training`` upcasts the rest to fp32),
  16 x 64 tokens, and 2 x 2048 tokens with gradient checkpointing;
* fast path: bf16 compute + bf16 autocast, frozen weights kept in bf16, 2 x 2048 packed tokens
  (documents of 256-1024 tokens separated by ``position_ids`` resets, which transformers turns into
  a block-diagonal mask), checkpointing on all / some / no layers, Liger kernels (fused linear +
  cross-entropy, RMSNorm, SwiGLU, RoPE) when the package is importable.

Reported: tokens/s from the median step time over ``--steps`` after ``--warmup``, peak memory.
"""
from __future__ import annotations

import argparse
import itertools
import time

import torch

import _common as C

TARGETS = "[qkv_proj,o_proj,gate_up_proj,down_proj]"
RECIPE = ["task=sft", "quant.bits=4", "quant.quant_type=nf4", "quant.double_quant=true", "quant.compute_dtype=float32",
          "lora.r=8", "lora.alpha=16", "lora.dropout=0.05", f"lora.target_modules={TARGETS}", "train.report_to=[none]"]
FAST = [o for o in RECIPE if not o.startswith("quant.compute_dtype")] + ["quant.compute_dtype=bfloat16", "train.bf16=true"]

# (name, model group, batch, seq, options) -- options: ckpt (fraction of layers, 0 = off), packed, liger
VARIANTS = [
    ("recipe: fp32 compute, 16x64", "recipe", 16, 64, {"ckpt": 0}),
    ("recipe: fp32 compute, 2x2048, ckpt", "recipe", 2, 2048, {"ckpt": 1.0}),
    ("bf16, 2x2048 packed, ckpt all", "fast", 2, 2048, {"ckpt": 1.0, "packed": True}),
    ("bf16, 2x2048 packed, ckpt half", "fast", 2, 2048, {"ckpt": 0.5, "packed": True}),
    ("bf16, 2x2048 packed, no ckpt", "fast", 2, 2048, {"ckpt": 0, "packed": True}),
    ("bf16, 2x2048 unpacked (causal), no ckpt", "fast", 2, 2048, {"ckpt": 0}),
    ("bf16, 2x2048 packed, ckpt quarter", "fast", 2, 2048, {"ckpt": 0.25, "packed": True}),
    ("bf16, compiled layers, 2x2048 packed, no ckpt", "fast", 2, 2048, {"ckpt": 0, "packed": True, "compile": True}),
    ("bf16, compiled layers, 2x2048 packed, ckpt quarter", "fast", 2, 2048, {"ckpt": 0.25, "packed": True, "compile": True}),
    ("bf16 + Liger, 2x2048 packed, ckpt half", "fast", 2, 2048, {"ckpt": 0.5, "packed": True, "liger": True}),
    ("bf16 + Liger, 2x2048 packed, ckpt quarter", "fast", 2, 2048, {"ckpt": 0.25, "packed": True, "liger": True}),
    ("bf16 + Liger, 2x2048 packed, no ckpt", "fast", 2, 2048, {"ckpt": 0, "packed": True, "liger": True}),
    ("bf16 + Liger + compiled layers, 2x2048 packed, no ckpt", "fast", 2, 2048, {"ckpt": 0, "packed": True, "liger": True, "compile": True}),
    ("bf16 + Liger + compiled layers, 2x2048 packed, ckpt quarter", "fast", 2, 2048, {"ckpt": 0.25, "packed": True, "liger": True, "compile": True}),
    ("NF4 dequantised, pure bf16, 2x2048 packed, ckpt all", "dequant", 2, 2048, {"ckpt": 1.0, "packed": True}),
    ("NF4 dequantised, pure bf16, 2x2048 packed, ckpt half", "dequant", 2, 2048, {"ckpt": 0.5, "packed": True}),
    ("NF4 dequantised, pure bf16, 2x2048 packed, no ckpt", "dequant", 2, 2048, {"ckpt": 0, "packed": True}),
    ("NF4 dequantised + Liger, 2x2048 packed, ckpt half", "dequant", 2, 2048, {"ckpt": 0.5, "packed": True, "liger": True}),
    ("NF4 dequantised + Liger, 2x2048 packed, no ckpt", "dequant", 2, 2048, {"ckpt": 0, "packed": True, "liger": True}),
]


def phi3_config(tiny: bool):
    from transformers import Phi3Config

    if tiny:
        return Phi3Config(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                          pad_token_id=32000, bos_token_id=1, eos_token_id=32000, sliding_window=2047)
    return Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                      original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                      pad_token_id=32000, bos_token_id=1, eos_token_id=32000, sliding_window=2047,
                      tie_word_embeddings=False)


def load(path, overrides, frozen_bf16: bool, dequant: bool = False):
    from transformers import AutoModelForCausalLM

    from loratune.config import load_config
    from loratune.models.adapters import attach_lora, bnb_config
    from loratune.models.speed import cast_frozen, dequantize_frozen

    cfg = load_config(None, overrides + [f"model.name={path}"])
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation="sdpa", quantization_config=bnb_config(cfg.quant),
        device_map={"": 0} if torch.cuda.is_available() else None,
    )
    model.config.use_cache = False
    # gradient checkpointing is switched per row below; attach_lora prepares input grads for it
    model = attach_lora(model, cfg, task_type="CAUSAL_LM", gradient_checkpointing=True)
    if dequant:
        dequantize_frozen(model, torch.bfloat16)
        cfg.train.bf16 = False  # pure bf16: everything frozen is bf16, no autocast needed
    if frozen_bf16:
        cast_frozen(model, torch.bfloat16)
    return model, cfg


def set_ckpt(model, fraction: float):
    from loratune.models.speed import set_checkpointed_layers

    base = model.get_base_model()
    if fraction <= 0:
        base.gradient_checkpointing_disable()
        return 0
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return set_checkpointed_layers(base, fraction)


def packed_position_ids(bs: int, seq: int, g: torch.Generator) -> torch.Tensor:
    """position_ids restarting at each document boundary (documents of 256-1024 tokens)."""
    rows = []
    for _ in range(bs):
        pos, n = [], 0
        while n < seq:
            length = min(int(torch.randint(256, 1025, (1,), generator=g)), seq - n)
            pos.extend(range(length))
            n += length
        rows.append(pos)
    return torch.tensor(rows)


def run_variant(model, cfg, name, bs, seq, opts, args):
    row = dict(variant=name, batch=bs, seq=seq, tokens=bs * seq)
    if opts.get("liger"):
        from liger_kernel.transformers import apply_liger_kernel_to_phi3

        apply_liger_kernel_to_phi3(model=model.get_base_model())
    row["ckpt_layers"] = set_ckpt(model, opts.get("ckpt", 0))
    if opts.get("compile"):  # regional: every decoder layer shares one compiled graph (train.compile_layers)
        from loratune.models.speed import checkpointing_layers

        for layer in checkpointing_layers(model):
            layer.compile()
    model.train()
    C.reset_memory()
    dev = C.device()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)
    amp = torch.bfloat16 if (cfg.train.bf16 and torch.cuda.is_available()) else None
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2):
        ids = torch.randint(0, 32000, (bs, seq), generator=g)
        b = dict(input_ids=ids.to(dev), labels=ids.to(dev))
        if opts.get("packed"):
            b["position_ids"] = packed_position_ids(bs, seq, g).to(dev)
        batches.append(b)
    cycle = itertools.cycle(batches)

    def step():
        with C.autocast(amp):
            loss = model(**next(cycle)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        row["loss"] = float(loss.detach())

    times = C.time_steps(step, args.warmup, args.steps)
    row.update(step_s=C.median(times), tok_s=bs * seq / C.median(times), peak_gib=C.peak_gib(), reserved_gib=C.peak_reserved_gib())
    del opt, params, batches, cycle
    C.reset_memory()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--skip", default="", help="comma-separated row names (substring) to leave out")
    ap.add_argument("--rows", default="", help="comma-separated substrings: run only rows whose name has one")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    info = C.versions()
    print("versions:", info, flush=True)
    from transformers import Phi3ForCausalLM

    path = C.save_random(Phi3ForCausalLM, phi3_config(args.tiny), "phi3-mini" + ("-tiny" if args.tiny else ""), torch.bfloat16)
    skips = [s for s in args.skip.split(",") if s]
    rows, loaded = [], {}
    for name, group, bs, seq, opts in VARIANTS:
        if any(s in name for s in skips) or (args.rows and not any(s in name for s in args.rows.split(","))):
            continue
        t0 = time.time()
        try:
            if group not in loaded:
                loaded.clear()
                C.reset_memory()
                loaded[group] = load(path, RECIPE if group == "recipe" else FAST, frozen_bf16=group != "recipe", dequant=group == "dequant")
            model, cfg = loaded[group]
            row = run_variant(model, cfg, name, bs, seq, opts, args)
        except Exception as exc:
            if not C.is_oom(exc):
                import traceback

                traceback.print_exc()
            row = dict(variant=name, batch=bs, seq=seq, error=f"{type(exc).__name__}: {str(exc)[:160]}")
            C.reset_memory()
        row["wall_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(row, flush=True)
        C.write_json("llm_sft_speed.json", dict(versions=info, args=vars(args), rows=rows))
    base = next((r.get("tok_s") for r in rows if "2048" in r["variant"] and "recipe" in r["variant"]), None)
    for r in rows:
        if base and r.get("tok_s"):
            r["x_recipe_2048"] = r["tok_s"] / base
    C.print_table(f"Phi-3-mini QLoRA SFT ({info['device']})", rows,
                  ["variant", "tokens", "ckpt_layers", "tok_s", "x_recipe_2048", "peak_gib", "reserved_gib", "step_s", "loss", "error"])


if __name__ == "__main__":
    main()
