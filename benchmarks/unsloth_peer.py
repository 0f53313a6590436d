"""A peer on the same card: Unsloth's QLoRA path beside loratune's, Phi-3-mini, 2 x 2048 tokens.

    python benchmarks/unsloth_peer.py --unsloth-path /tmp/uns   # GPU; each side in its own process

Unsloth patches transformers, PEFT and TRL when it is imported, so each side runs in a fresh
process (``--side``); the Unsloth side gets ``--unsloth-path`` (unsloth, unsloth_zoo and the
TRL/datasets versions it pins) first on ``PYTHONPATH``. Both load the same random-weight Phi-3-mini-4k
(``llm_sft_speed.phi3_config``, bf16 checkpoint) in 4-bit NF4 + double quantisation with bf16 compute
and train LoRA r8 / alpha 16 / dropout 0.05 on every projection. The step is the same loop on both
sides: forward on 2 x 2048 random token ids (labels = inputs, one causal sequence per row, no
packing), backward, clip-grad 1.0, torch AdamW; median of ``--steps`` synchronised steps after
``--warmup``; peak memory = ``torch.cuda.max_memory_allocated`` (weights included).

Rows: loratune's shipped Phi-3 recipe (``configs/phi3-mini-yoda-qlora.yaml``: bf16 autocast, frozen
bf16, compiled layers, TRL's fused LM head, no checkpointing); Unsloth ``FastLanguageModel`` on the
same Phi-3 architecture (dispatched to its generic ``FastModel`` path) and on the same weights in
Llama layout (q/k/v and gate/up split, as Unsloth's own Phi-3 uploads are: its hand-written
``FastLlamaModel`` kernels), each with Unsloth's default gradient checkpointing ("unsloth",
offloaded) and without; one row with LoRA dropout 0, which Unsloth's fused LoRA kernels need.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _common as C
import torch

SEQ, BATCH = 2048, 2
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (name, side, architecture, options)
ROWS = [
    ("loratune: shipped Phi-3 recipe (compiled layers, fused LM head, no ckpt)", "loratune", "phi3", {}),
    ("loratune: shipped Phi-3 recipe + gradient checkpointing", "loratune", "phi3", {"ckpt": True}),
    ("unsloth: Phi-3 architecture, ckpt 'unsloth'", "unsloth", "phi3", {"ckpt": "unsloth"}),
    ("unsloth: Phi-3 architecture, no ckpt", "unsloth", "phi3", {"ckpt": False}),
    ("unsloth: Llama layout, ckpt 'unsloth'", "unsloth", "llama", {"ckpt": "unsloth"}),
    ("unsloth: Llama layout, no ckpt", "unsloth", "llama", {"ckpt": False}),
    ("unsloth: Llama layout, no ckpt, LoRA dropout 0", "unsloth", "llama", {"ckpt": False, "dropout": 0.0}),
]


def checkpoints(tiny: bool):
    """The random Phi-3 checkpoint and the same weights in Llama layout (split fused projections)."""
    from llm_sft_speed import phi3_config
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, Phi3ForCausalLM

    cfg = phi3_config(tiny)
    phi3 = C.save_random(Phi3ForCausalLM, cfg, "phi3-mini" + ("-tiny" if tiny else ""), torch.bfloat16)
    if not (phi3 / "tokenizer.json").is_file():  # Unsloth loads a tokenizer with the model; the ids below skip it
        sys.path.insert(0, str(C.REPO / "tests"))
        from sft_tiny import make_tokenizer

        make_tokenizer().save_pretrained(phi3)
    llama = C.scratch_dir() / ("phi3-mini-llama" + ("-tiny" if tiny else ""))
    if not (llama / "config.json").is_file():
        sd = {}
        for f in sorted(phi3.glob("*.safetensors")):
            sd.update(load_file(f))
        h, ff = cfg.hidden_size, cfg.intermediate_size
        out = {}
        for k, v in sd.items():
            if k.endswith("qkv_proj.weight"):
                q, kk, vv = v.split([h, h, h])  # num_key_value_heads == num_attention_heads in Phi-3-mini
                p = k[: -len("qkv_proj.weight")]
                out.update({p + "q_proj.weight": q.contiguous(), p + "k_proj.weight": kk.contiguous(), p + "v_proj.weight": vv.contiguous()})
            elif k.endswith("gate_up_proj.weight"):
                g, u = v.split([ff, ff])
                p = k[: -len("gate_up_proj.weight")]
                out.update({p + "gate_proj.weight": g.contiguous(), p + "up_proj.weight": u.contiguous()})
            else:
                out[k] = v
        llama.mkdir(parents=True, exist_ok=True)
        LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=h, intermediate_size=ff, num_hidden_layers=cfg.num_hidden_layers,
                    num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                    max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps, rope_theta=10000.0,
                    pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                    tie_word_embeddings=False, torch_dtype="bfloat16").save_pretrained(llama)
        save_file(out, str(llama / "model.safetensors"), metadata={"format": "pt"})
        for f in phi3.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens")):
                (llama / f.name).write_bytes(f.read_bytes())
    return {"phi3": phi3, "llama": llama}


def batches(dev, vocab: int = 32000):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
        out.append(dict(input_ids=ids.to(dev), labels=ids.to(dev)))
    return out


def timed(model, params, forward, args) -> dict:
    import itertools

    opt = torch.optim.AdamW(params, lr=2e-4)
    cycle = itertools.cycle(batches(C.device()))
    last = {}

    def step():
        loss = forward(next(cycle))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = loss.detach()

    times = C.time_steps(step, args.warmup, args.steps)
    step_s = C.median(times)
    return dict(step_s=step_s, tok_s=BATCH * SEQ / step_s, samples_s=BATCH / step_s, peak_gib=C.peak_gib(),
                reserved_gib=C.peak_reserved_gib(), loss=float(last["loss"]),
                trainable_params=sum(p.numel() for p in params))


def run_loratune(path: Path, opts: dict, args) -> dict:
    from llm_sft_speed import PHI3_YAML, load

    model, cfg = load(path, yaml=PHI3_YAML, fused_head=True,
                      overrides=[f"lora.target_modules=[{','.join(PHI3_TARGETS)}]", "lora.r=8", "lora.alpha=16", "lora.dropout=0.05"]
                      + (["train.gradient_checkpointing=true"] if opts.get("ckpt") else []))
    model.train()
    C.reset_memory()
    params = [p for p in model.parameters() if p.requires_grad]
    amp = torch.bfloat16 if torch.cuda.is_available() else None

    def forward(b):
        with C.autocast(amp):
            return model(**b, fused_lm_head=True).loss

    return timed(model, params, forward, args)


def run_unsloth(path: Path, arch: str, opts: dict, args) -> dict:
    import unsloth  # noqa: F401  (first: it patches transformers / peft / trl)
    from unsloth import FastLanguageModel

    model, _tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=SEQ, dtype=torch.bfloat16, load_in_4bit=True,
                                                     local_files_only=True)
    model = FastLanguageModel.get_peft_model(
        model, r=8, lora_alpha=16, lora_dropout=opts.get("dropout", 0.05), bias="none",
        target_modules=PHI3_TARGETS if arch == "phi3" else LLAMA_TARGETS,
        use_gradient_checkpointing=opts["ckpt"], random_state=0, max_seq_length=SEQ)
    FastLanguageModel.for_training(model)
    C.reset_memory()
    params = [p for p in model.parameters() if p.requires_grad]
    return dict(timed(model, params, lambda b: model(**b).loss, args), unsloth=unsloth.__version__)


def side(args):
    """One row in this process; prints its JSON on the last line."""
    name, who, arch, opts = next(r for r in ROWS if r[0] == args.row)
    paths = checkpoints(args.tiny)
    C.quiet()
    row = dict(row=name, side=who, arch=arch, batch=BATCH, seq=SEQ, **{k: str(v) for k, v in opts.items()})
    row.update(run_loratune(paths[arch], opts, args) if who == "loratune" else run_unsloth(paths[arch], arch, opts, args))
    import peft
    import transformers

    row.update(transformers=transformers.__version__, peft=peft.__version__)
    try:
        import trl

        row["trl"] = trl.__version__
    except Exception:
        pass
    print("ROW " + json.dumps(row), flush=True)


def main():
    ap = C.bench_parser(__doc__)
    ap.add_argument("--unsloth-path", default="", help="folder(s) put first on PYTHONPATH for the Unsloth rows")
    ap.add_argument("--row", default="", help="internal: run this one row in this process")
    args = ap.parse_args()
    args.json = args.json or "unsloth_peer.json"
    if args.row:
        return side(args)
    info = C.start(args)
    checkpoints(args.tiny)  # built once, before the row processes
    rows = []
    for name, who, _arch, _opts in ROWS:
        if not C.selected(name, args):
            continue
        extra = [a for a in sys.argv[1:] if a in ("--tiny",)] + ["--warmup", str(args.warmup), "--steps", str(args.steps)]
        env = dict(os.environ)
        if who == "unsloth" and args.unsloth_path:
            env["PYTHONPATH"] = os.pathsep.join([args.unsloth_path, env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, __file__, "--row", name, *extra], env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode or not lines:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
            print(f"{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", flush=True)
            rows.append(dict(row=name, side=who, error=err, stderr_tail=proc.stderr[-4000:]))
        else:
            rows.append(json.loads(lines[-1][4:]))
        C.write_json(args.json, dict(versions=info, args=vars(args), rows=rows))
    base = next((r.get("tok_s") for r in rows if r.get("side") == "loratune" and r.get("tok_s")), None)
    C.add_ratio(rows, "tok_s", base, "x_loratune")
    C.write_json(args.json, dict(versions=info, args=vars(args), rows=rows))
    C.print_table(f"Phi-3-mini QLoRA, {BATCH}x{SEQ} tokens ({info['device']})", rows,
                  ["row", "tok_s", "samples_s", "x_loratune", "peak_gib", "reserved_gib", "trainable_params", "loss", "error"])


if __name__ == "__main__":
    main()
