"""FSDP + QLoRA of a Llama-3.1-70B-architecture causal LM through the real ``loratune train``, N GPUs.

    python benchmarks/fsdp_qlora_speed.py --gpus 2,4 --layers 8 --steps 10      # one multi-GPU host
    python benchmarks/fsdp_qlora_speed.py --gpus 1 --layers 8 --steps 8          # one GPU: the code path only
    python benchmarks/fsdp_qlora_speed.py --tiny --gpus 2 --steps 3              # CPU rehearsal: 2 gloo processes

What it runs, per N: ``accelerate launch --config_file configs/accelerate/fsdp-qlora.yaml --num_processes N
-m loratune train configs/llama-3.1-70b-fsdp-qlora.yaml model.name=DIR data.hub=null data.jsonl=FILE
train.max_steps=S ...`` (the recipe's own launch line; ``loratune train --gpus N`` starts plain torchrun,
i.e. DDP with one whole 4-bit copy per GPU, which ``--modes ddp`` measures beside it).

The model: the Llama-3.1-70B architecture (hidden 8192, FFN 28672, 64 heads / 8 KV heads, vocab 128256,
RoPE llama3 scaling) with **random bf16 weights and ``--layers`` decoder layers** (80 in the real
model). The full depth is not built: 70B bf16 is 141 GB of safetensors, more than the 2-GPU host's
128 GB disk and minutes of a lease to write and read back; each layer is the real layer, so the
per-layer cost and memory are the real ones, and the full model's are about
``80 / layers`` times the layer part (``summary`` gives both parts). The checkpoint is saved once
under ``/dev/shm`` and quantised on load by loratune (NF4 + double quant, bf16 storage, as the
recipe). Tokenizer: the tests' small BPE tokenizer with a chat template (ids < 600 of the 128256
embedding rows). Data: random prompt/completion rows in the recipe's own column names
(``sentence`` / ``translation_extra``), packed into 2048-token sequences by the recipe.

Reported per run: steady sequences/s and tokens/s (``summary.json``, the first 5 optimiser steps and
saves left out; tokens = sequences x 2048, packing fills every sequence), per GPU; peak memory per GPU
from ``nvidia-smi`` sampled every 0.5 s (what the process holds: allocator reserve + CUDA context) and
rank 0's ``torch.cuda.max_memory_allocated`` (``peak_gpu_gb``); load time to the first step; the exit
code and the error tail if a run failed.
"""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import _common as C

RECIPE = C.REPO / "configs" / "llama-3.1-70b-fsdp-qlora.yaml"
ACCEL = C.REPO / "configs" / "accelerate" / "fsdp-qlora.yaml"
SEQ = 2048
CHARS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你说年abcdefghijklmnopqrstuvwxyz ,."


def llama70b_config(layers: int, tiny: bool, tok):
    from transformers import LlamaConfig

    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if tiny:
        return LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, **ids)
    return LlamaConfig(  # meta-llama/Llama-3.1-70B-Instruct's config.json, depth cut to ``layers``
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=layers, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False, **ids)


def build(layers: int, tiny: bool) -> Path:
    """Random-weight checkpoint (bf16 safetensors) + tokenizer, saved once under the scratch folder."""
    import torch
    from transformers import LlamaForCausalLM

    sys.path.insert(0, str(C.REPO / "tests"))
    from sft_tiny import make_tokenizer

    path = C.scratch_dir() / ("llama70b-tiny" if tiny else f"llama70b-{layers}l")
    if (path / "config.json").is_file():
        return path
    tok = make_tokenizer()
    cfg = llama70b_config(layers, tiny, tok)
    t0 = time.time()
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size="5GB")
    tok.save_pretrained(path)
    (path / "built.json").write_text(json.dumps(dict(params=n, layers=cfg.num_hidden_layers, build_s=round(time.time() - t0, 1))))
    del model
    C.reset_memory()
    print(f"built {path}: {n / 1e9:.2f} B parameters, {cfg.num_hidden_layers} layers, {time.time() - t0:.0f} s", flush=True)
    return path


def make_data(path: Path, rows: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(rows):
            prompt = "".join(rng.choice(CHARS) for _ in range(rng.randint(100, 300)))
            answer = "".join(rng.choice(CHARS) for _ in range(rng.randint(200, 500)))
            f.write(json.dumps({"sentence": prompt, "translation_extra": answer, "translation": ""}, ensure_ascii=False) + "\n")
    return path


def accelerate_config(tiny: bool, out: Path) -> Path:
    """The shipped FSDP config; on the CPU the same with use_cpu and no bf16 mixed precision."""
    if not tiny:
        return ACCEL
    import yaml

    cfg = yaml.safe_load(ACCEL.read_text())
    cfg.update(use_cpu=True, mixed_precision="no")
    path = out / "fsdp-qlora-cpu.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SHIM = '''"""Run loratune on a transformers without TrainingArguments.activation_checkpointing (written by fsdp_qlora_speed.py).

loratune.llm.train.sft_args passes transformers 5.2x's ``activation_checkpointing``; older 5.x (5.17 on the
GPU image) names it ``gradient_checkpointing``: map one onto the other, then run ``python -m loratune``.
"""
import dataclasses
import runpy

import transformers

if "activation_checkpointing" not in {f.name for f in dataclasses.fields(transformers.TrainingArguments)}:
    import trl

    _orig = trl.SFTConfig.__init__

    def __init__(self, *args, activation_checkpointing=False, activation_checkpointing_kwargs=None, **kwargs):
        if activation_checkpointing:
            kwargs.setdefault("gradient_checkpointing", True)
            kwargs.setdefault("gradient_checkpointing_kwargs", activation_checkpointing_kwargs)
        _orig(self, *args, **kwargs)

    trl.SFTConfig.__init__ = __init__
runpy.run_module("loratune", run_name="__main__", alter_sys=True)
'''


def needs_shim() -> bool:
    import dataclasses

    from transformers import TrainingArguments

    return "activation_checkpointing" not in {f.name for f in dataclasses.fields(TrainingArguments)}


class GpuMemory:
    """Max memory.used per GPU (MiB) from nvidia-smi, sampled every 0.5 s while a run lasts."""

    def __init__(self):
        self.peak, self.stop = {}, threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                for line in out.strip().splitlines():
                    i, mib = (int(x) for x in line.split(","))
                    self.peak[i] = max(self.peak.get(i, 0), mib)
            except Exception:
                pass
            self.stop.wait(0.5)

    def __enter__(self):
        if C.torch.cuda.is_available():
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread.is_alive():
            self.thread.join(timeout=15)


def train_once(mode: str, n: int, model_dir: Path, data: Path, args, out: Path) -> dict:
    run_dir = out / f"{mode}{n}"
    overrides = [f"model.name={model_dir}", "data.hub=null", f"data.jsonl={data}", f"train.output_dir={run_dir}",
                 f"train.max_steps={args.steps}", "train.eval_strategy=no", "train.load_best_model_at_end=false",
                 "train.report_to=[none]", "train.logging_steps=1", "train.overwrite=true",
                 f"train.grad_accum={args.grad_accum}", *args.override]
    if args.tiny:
        overrides += ["train.bf16=false", "quant.compute_dtype=float32", "quant.quant_storage=float32", "train.threads=1"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(C.REPO / "src"), env.get("PYTHONPATH", "")])
    entry = "loratune"
    if args.shim and needs_shim():
        (out / "shim").mkdir(exist_ok=True)
        (out / "shim" / "loratune_compat.py").write_text(SHIM)
        env["PYTHONPATH"] = os.pathsep.join([str(out / "shim"), env["PYTHONPATH"]])
        entry = "loratune_compat"
    if mode == "fsdp":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(args.tiny, out)),
               "--num_processes", str(n), "--main_process_port", str(29500 + n), "-m", entry, "train", str(RECIPE), *overrides]
    else:  # DDP: loratune's own launcher (torchrun), one whole 4-bit copy per GPU
        cmd = [sys.executable, "-m", entry, "train", str(RECIPE), *overrides] + (["--gpus", str(n)] if n > 1 else [])
    if n == 1 and "CUDA_VISIBLE_DEVICES" not in env and C.torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = "0"
    print("running:", " ".join(cmd), flush=True)
    t0 = time.time()
    with GpuMemory() as mem:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.run_timeout)
    wall = time.time() - t0
    (out / f"{mode}{n}.log").write_text(proc.stdout[-200000:] + "\n--- stderr ---\n" + proc.stderr[-200000:])
    row = dict(mode=mode, gpus=n, wall_s=round(wall, 1), exit=proc.returncode, compat_shim=entry != "loratune",
               peak_gpu_mib_nvidia_smi={str(k): v for k, v in sorted(mem.peak.items())})
    if mem.peak:
        row["peak_gib_per_gpu_max"] = round(max(mem.peak.values()) / 1024, 2)
    summary = run_dir / "summary.json"
    if proc.returncode or not summary.is_file():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        # the first rank's exception line, not torchrun's "ChildFailedError" trailer
        causes = [line for line in lines if re.match(r"^(\[rank\d+\]: )?[\w.]*(Error|Exception)\b.*:", line)
                  and "ChildFailedError" not in line]
        tail = lines[-40:]
        print(f"{mode} x{n}: exit {proc.returncode}\n" + "\n".join(tail), flush=True)
        row.update(error=(causes or tail or ["?"])[0][:400], stderr_tail="\n".join(tail)[-6000:])
        if not summary.is_file():
            return row
    s = json.loads(summary.read_text())
    for k in ("steady_samples_per_second", "steady_step_s", "steady_steps_timed", "mean_samples_per_second_after_warmup",
              "stalled_steps", "peak_gpu_gb", "peak_rss_gb", "train_loss", "global_step", "trainable_params", "total_params",
              "wall_time_s", "first_step_unix", "footprint_gb_base", "train_samples_per_second"):
        row[k] = s.get(k)
    if s.get("steady_samples_per_second"):
        row["tokens_s"] = round(s["steady_samples_per_second"] * SEQ, 1)
        row["tokens_s_per_gpu"] = round(row["tokens_s"] / n, 1)
    if s.get("first_step_unix"):
        row["to_first_step_s"] = round(s["first_step_unix"] - t0, 1)
    return row


def main():
    ap = C.bench_parser(__doc__)
    ap.add_argument("--gpus", default="2,4", help="comma-separated process counts, e.g. 1,2,4")
    ap.add_argument("--modes", default="fsdp", help="fsdp (accelerate launch + the FSDP config) and/or ddp (loratune train --gpus N)")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the 70B architecture (80 = full depth)")
    ap.add_argument("--grad-accum", type=int, default=8, help="train.grad_accum (the recipe's 8)")
    ap.add_argument("--data-rows", type=int, default=0, help="data rows (default: enough for every step)")
    ap.add_argument("--run-timeout", type=int, default=3000, help="seconds before one training run is stopped")
    ap.add_argument("--shim", action="store_true",
                    help="on a transformers without TrainingArguments.activation_checkpointing (5.17), map loratune's "
                         "activation_checkpointing onto gradient_checkpointing through a wrapper module (the run is marked)")
    ap.add_argument("--override", action="append", default=[], help="extra key=value for every run (repeatable)")
    args = ap.parse_args()
    args.steps = max(args.steps, 7) if not args.tiny else args.steps  # 5 warm-up steps are left out of the timing
    args.json = args.json or "fsdp_qlora_speed.json"
    info = C.start(args)
    out = C.out_dir() / "fsdp"
    out.mkdir(parents=True, exist_ok=True)
    gpus = [int(x) for x in args.gpus.split(",") if x]
    model_dir = build(args.layers, args.tiny)
    built = json.loads((model_dir / "built.json").read_text())
    need = max(gpus) * args.grad_accum * args.steps * SEQ  # tokens the longest run consumes (batch 1 per GPU)
    data = make_data(C.scratch_dir() / "fsdp-sft.jsonl", args.data_rows or max(200, int(need / 900 * 1.5)))
    rows = []
    for mode in args.modes.split(","):
        for n in gpus:
            row = dict(train_once(mode, n, model_dir, data, args, out), layers=built["layers"], params=built["params"],
                       build_s=built.get("build_s"), grad_accum=args.grad_accum, seq=SEQ)
            rows.append(row)
            C.write_json(args.json, dict(versions=info, args=vars(args), rows=rows))
    base = next((r.get("tokens_s") for r in rows if r.get("tokens_s")), None)
    C.add_ratio(rows, "tokens_s", base, "x_first")
    C.write_json(args.json, dict(versions=info, args=vars(args), rows=rows))
    C.print_table(f"FSDP + QLoRA, Llama-3.1-70B architecture x {built['layers']} layers, {SEQ}-token packed sequences ({info['device']})",
                  rows, ["mode", "gpus", "tokens_s", "tokens_s_per_gpu", "x_first", "peak_gib_per_gpu_max", "peak_gpu_gb",
                         "to_first_step_s", "wall_s", "train_loss", "exit", "error"])


if __name__ == "__main__":
    main()
