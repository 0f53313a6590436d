"""Causal-LM QLoRA SFT speed (Phi-3-mini architecture): the tutorial recipe vs loratune's fast path.

    python benchmarks/llm_sft_speed.py                    # needs a CUDA GPU
    python benchmarks/llm_sft_speed.py --tiny --steps 2   # CPU rehearsal on a tiny architecture

Phi-3-mini-4k is built from ``Phi3Config`` with random weights (bf16, as published), saved once and
loaded back through ``from_pretrained`` with bitsandbytes 4-bit NF4 + double quantisation, then
``loratune.core.adapters.attach_lora`` (LoRA r8 on qkv_proj, o_proj, gate_up_proj, down_proj).
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

import itertools

import _common as C
import torch

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
    ("bf16, compiled layers, TRL fused LM head, 2x2048 packed, no ckpt", "fused", 2, 2048, {"ckpt": 0, "packed": True, "compile": True, "fused": True}),
    ("bf16, compiled layers, TRL fused LM head, 2x2048 packed, ckpt eighth", "fused", 2, 2048, {"ckpt": 0.125, "packed": True, "compile": True, "fused": True}),
    ("bf16, flex attention, compiled layers, TRL fused LM head, 2x2048 packed, no ckpt", "flex", 2, 2048, {"ckpt": 0, "packed": True, "compile": True, "fused": True}),
    ("bf16, compiled layers, TRL fused LM head, 16x64 packed, no ckpt", "fused", 16, 64, {"ckpt": 0, "packed": True, "compile": True, "fused": True}),
    ("bf16, flex attention, compiled layers, TRL fused LM head, 16x64 packed, no ckpt", "flex", 16, 64, {"ckpt": 0, "packed": True, "compile": True, "fused": True}),
    ("shipped recipe (configs/phi3-mini-yoda-qlora.yaml as is), 16x64 packed", "shipped", 16, 64, {"packed": True, "fused": True}),
    ("shipped recipe + model.attn_implementation=flex_attention, 2x2048 packed", "shipped-flex", 2, 2048, {"packed": True, "fused": True}),
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


# how each model group is loaded: frozen weights cast to bf16, NF4 dequantised, TRL's fused LM head
# (what SFTTrainer patches in: per-token log-probs in chunks, no (tokens x vocab) fp32 logits),
# attention; "yaml": the shipped recipe as is, through loratune's own attach_lora + apply_training_speed
PHI3_YAML = "phi3-mini-yoda-qlora.yaml"
GROUPS = {
    "recipe": dict(overrides=RECIPE, frozen_bf16=False),
    "fast": dict(overrides=FAST, frozen_bf16=True),
    "dequant": dict(overrides=FAST, frozen_bf16=True, dequant=True),
    "fused": dict(overrides=FAST, frozen_bf16=True, fused_head=True),
    "flex": dict(overrides=FAST, frozen_bf16=True, fused_head=True, attn="flex_attention"),
    "shipped": dict(yaml=PHI3_YAML, fused_head=True),
    "shipped-flex": dict(yaml=PHI3_YAML, fused_head=True, overrides=["model.attn_implementation=flex_attention"]),
}


def load(path, overrides=(), frozen_bf16: bool = False, dequant: bool = False, fused_head: bool = False,
         attn: str = "sdpa", yaml: str = None):
    from transformers import AutoModelForCausalLM

    from loratune.config import load_config
    from loratune.core.adapters import attach_lora, bnb_config
    from loratune.core.speed import apply_training_speed, cast_frozen, dequantize_frozen

    cfg = load_config(C.REPO / "configs" / yaml if yaml else None, list(overrides) + [f"model.name={path}", "train.report_to=[none]"])
    if yaml:
        attn = cfg.model.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, attn_implementation=attn, quantization_config=bnb_config(cfg.quant),
        device_map={"": 0} if torch.cuda.is_available() else None,
    )
    model.config.use_cache = False
    if fused_head:  # before PEFT wraps the model, as SFTTrainer does
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    if yaml:  # exactly what loratune train does with the recipe's settings
        model = attach_lora(model, cfg, task_type="CAUSAL_LM")
        apply_training_speed(model, cfg)
        return model, cfg
    # gradient checkpointing is switched per row below; attach_lora prepares input grads for it
    model = attach_lora(model, cfg, task_type="CAUSAL_LM", gradient_checkpointing=True)
    if dequant:
        dequantize_frozen(model, torch.bfloat16)
        cfg.train.bf16 = False  # pure bf16: everything frozen is bf16, no autocast needed
    if frozen_bf16:
        cast_frozen(model, torch.bfloat16)
    return model, cfg


def set_ckpt(model, fraction: float):
    from loratune.core.speed import set_checkpointed_layers

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
    if "ckpt" in opts:  # shipped rows keep the recipe's own checkpointing
        row["ckpt_layers"] = set_ckpt(model, opts["ckpt"])
    if opts.get("compile"):  # what train.compile_layers does: every decoder layer shares one graph
        from loratune.core.speed import compile_layers

        torch._dynamo.reset()  # fresh graphs per row: no recompile limit reached, no graph of another row reused
        compile_layers(model)
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
            if opts.get("fused"):  # SFTTrainer's loss: the fused head's mean negative log-likelihood
                loss = model(**next(cycle), fused_lm_head=True).loss
            else:
                loss = model(**next(cycle)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        row["loss"] = loss.detach()  # a tensor: reading it here would synchronise every step

    times = C.time_steps(step, args.warmup, args.steps, args.pipelined)
    row.update(step_s=C.median(times), tok_s=bs * seq / C.median(times), peak_gib=C.peak_gib(), reserved_gib=C.peak_reserved_gib(),
               loss=float(row["loss"]), pipelined=args.pipelined)
    if args.profile and torch.cuda.is_available():
        row["profile"] = C.profile(step)
    del opt, params, batches, cycle
    C.reset_memory()
    return row


def main():
    args = C.bench_parser(__doc__).parse_args()
    info = C.start(args)
    from transformers import Phi3ForCausalLM

    path = C.save_random(Phi3ForCausalLM, phi3_config(args.tiny), "phi3-mini" + ("-tiny" if args.tiny else ""), torch.bfloat16)
    loaded = {}

    def run_one(v):
        name, group, bs, seq, opts = v
        if group not in loaded:  # rows of one group share one loaded model (see the note in RESULTS.md)
            loaded.clear()
            C.reset_memory()
            C.reset_sdpa()
            loaded[group] = load(path, **GROUPS[group])
        model, cfg = loaded[group]
        return run_variant(model, cfg, name, bs, seq, opts, args)

    rows = C.run_rows(VARIANTS, lambda v: v[0], run_one, "llm_sft_speed.json", info, args,
                      lambda v: dict(variant=v[0], batch=v[2], seq=v[3]))
    base = next((r.get("tok_s") for r in rows if "2048" in r["variant"] and "recipe" in r["variant"]), None)
    C.add_ratio(rows, "tok_s", base, "x_recipe_2048")
    C.print_table(f"Phi-3-mini QLoRA SFT ({info['device']})", rows,
                  ["variant", "tokens", "ckpt_layers", "tok_s", "x_recipe_2048", "peak_gib", "reserved_gib", "step_s", "loss", "error"])


if __name__ == "__main__":
    main()
