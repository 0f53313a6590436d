"""A peer on the same card, Whisper: Unsloth's Whisper path beside loratune's shipped turbo recipe.

    python benchmarks/unsloth_whisper_peer.py --processor DIR                       # here: processor + config (~2 MB)
    python benchmarks/unsloth_whisper_peer.py --processor DIR --unsloth-path /tmp/uns   # GPU: one process a row
    python benchmarks/unsloth_whisper_peer.py --processor DIR --tiny --steps 1 --warmup 1  # CPU rehearsal (loratune rows)

Unsloth patches transformers and PEFT when it is imported, so every row runs in a fresh process
(``--row``); the Unsloth rows get ``--unsloth-path`` (unsloth, unsloth_zoo and what they pin) first on
``PYTHONPATH``. Both sides load the same random-weight Whisper large-v3-turbo (d_model 1280, 32+4
layers, 20 heads, 128 mels; fp16 checkpoint; vocab 51865 of the packaged multilingual tokenizer,
``recipe_trainer_e2e.prepare``, instead of turbo's 51866: same speed), whose folder also holds the
processor Unsloth's loader asks for. LoRA r8 / alpha 16 / dropout 0.05 on ``q_proj``, ``v_proj``
(the shipped ``configs/whisper-large-v3-turbo-zh-qlora.yaml``), batch 8 (its ``train.batch_size``),
30-s log-mels (8 x 128 x 3000, float32) and 24-token labels; the same step on both sides (bf16
autocast as the Trainer's ``bf16=true``, forward with labels, backward, clip-grad 1.0, torch AdamW
lr 1e-4); median of ``--steps`` synchronised steps after ``--warmup``; peak memory =
``torch.cuda.max_memory_allocated`` (weights included).

Rows: loratune's shipped turbo recipe as is (NF4 loaded then dequantised to bf16, frozen bf16,
compiled layers with CUDA graphs, cuDNN attention; ``whisper_train_speed.build``, the path
``loratune train`` takes); Unsloth's documented Whisper path (``FastModel.from_pretrained(...,
auto_model=WhisperForConditionalGeneration, whisper_language=..., whisper_task=...)`` then
``FastModel.get_peft_model(..., task_type=None)``) in 4-bit (QLoRA, ``load_in_4bit=True``) and in 16-bit
(its notebook's ``load_in_4bit=False``, ``dtype=None`` = bf16 here), each with its default
checkpointing ``"unsloth"`` and without.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _common as C
import torch

LABEL_TOKENS = 24
TARGETS = ["q_proj", "v_proj"]
# (name, side, options)
ROWS = [
    ("loratune: shipped turbo recipe (NF4 dequantised to bf16, compiled layers + CUDA graphs, cuDNN attention)", "loratune", {}),
    ("unsloth: Whisper path, 4-bit (QLoRA), ckpt 'unsloth'", "unsloth", {"bits": 4, "ckpt": "unsloth"}),
    ("unsloth: Whisper path, 4-bit (QLoRA), no ckpt", "unsloth", {"bits": 4, "ckpt": False}),
    ("unsloth: Whisper path, 16-bit LoRA (its notebook's load_in_4bit=False), no ckpt", "unsloth", {"bits": 16, "ckpt": False}),
    ("unsloth: Whisper path, 16-bit LoRA, ckpt 'unsloth' (its notebook's settings)", "unsloth", {"bits": 16, "ckpt": "unsloth"}),
]


def recipe_cfg(path: Path, tiny: bool):
    from whisper_train_speed import TURBO

    from loratune.config import load_config

    return load_config(C.REPO / "configs" / TURBO, [f"model.name={path}", "train.report_to=[none]"]
                       + (["train.batch_size=2"] if tiny else []))


def checkpoint(processor_dir: Path, tiny: bool) -> Path:
    """The processor folder (made here by ``recipe_trainer_e2e.prepare``) + random turbo weights."""
    from recipe_trainer_e2e import build_weights, prepare

    if not (processor_dir / "tokenizer.json").is_file():
        prepare(processor_dir, tiny)
    return build_weights(processor_dir, tiny)  # tiny: the folder itself (tiny weights are there)


def batches(bs: int, n_mels: int, dev):
    g = torch.Generator().manual_seed(0)
    return [((0.5 * torch.randn(bs, n_mels, 3000, generator=g)).to(dev),
             torch.randint(0, 50000, (bs, LABEL_TOKENS), generator=g).to(dev)) for _ in range(2)]


def timed(model, bs: int, lr: float, max_grad_norm: float, args) -> dict:
    import itertools

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    cycle = itertools.cycle(batches(bs, model.config.num_mel_bins, C.device()))
    amp = torch.bfloat16 if torch.cuda.is_available() else None  # the Trainer's bf16=true (none on the CPU)
    last = {}

    def step():
        feats, labels = next(cycle)
        with C.autocast(amp):
            loss = model(input_features=feats, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = loss.detach()

    C.reset_memory()  # weights stay counted in the peak; load-time transients do not
    times = C.time_steps(step, args.warmup, args.steps)
    step_s = C.median(times)
    return dict(batch=bs, step_s=step_s, samples_s=bs / step_s, peak_gib=C.peak_gib(), reserved_gib=C.peak_reserved_gib(),
                loss=float(last["loss"]), trainable_params=sum(p.numel() for p in params))


def run_loratune(path: Path, args) -> dict:
    from whisper_train_speed import build

    cfg = recipe_cfg(path, args.tiny)
    model = build(path, cfg, {"shipped": True})
    model.train()
    return timed(model, cfg.train.batch_size, cfg.train.lr, cfg.train.max_grad_norm, args)


def run_unsloth(path: Path, opts: dict, args) -> dict:
    import unsloth  # noqa: F401  (first: it patches transformers / peft)
    from transformers import WhisperForConditionalGeneration
    from unsloth import FastModel

    cfg = recipe_cfg(path, args.tiny)
    model, _processor = FastModel.from_pretrained(
        str(path), dtype=None, load_in_4bit=opts["bits"] == 4, auto_model=WhisperForConditionalGeneration,
        whisper_language="Chinese", whisper_task="transcribe", use_gradient_checkpointing=opts["ckpt"],
        local_files_only=True)
    model = FastModel.get_peft_model(
        model, r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=TARGETS, bias="none",
        use_gradient_checkpointing=opts["ckpt"], random_state=0, use_rslora=False, loftq_config=None,
        task_type=None)  # "MUST set this for Whisper" (its notebook)
    model.config.use_cache = False
    if hasattr(FastModel, "for_training"):
        FastModel.for_training(model)
    row = timed(model, cfg.train.batch_size, cfg.train.lr, cfg.train.max_grad_norm, args)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    row.update(unsloth=unsloth.__version__, weight_dtype=str(base.model.encoder.layers[0].fc1.weight.dtype),
               frozen_linear=type(base.model.encoder.layers[0].fc1).__name__)
    return row


def side(args):
    """One row in this process; prints its JSON on the last line."""
    name, who, opts = next(r for r in ROWS if r[0] == args.row)
    path = checkpoint(Path(args.processor), args.tiny)
    C.quiet()
    row = dict(row=name, side=who, label_tokens=LABEL_TOKENS, frames=3000, **{k: str(v) for k, v in opts.items()})
    row.update(run_loratune(path, args) if who == "loratune" else run_unsloth(path, opts, args))
    import peft
    import transformers

    row.update(transformers=transformers.__version__, peft=peft.__version__)
    for mod in ("bitsandbytes", "trl", "unsloth_zoo"):
        try:
            row[mod] = __import__(mod).__version__
        except Exception:
            pass
    print("ROW " + json.dumps(row), flush=True)


def main():
    ap = C.bench_parser(__doc__)
    ap.add_argument("--processor", required=True, help="folder with the Whisper processor + turbo config (made here if missing)")
    ap.add_argument("--prepare", action="store_true", help="only make the processor folder (any machine) and stop")
    ap.add_argument("--unsloth-path", default="", help="folder(s) put first on PYTHONPATH for the Unsloth rows")
    ap.add_argument("--row", default="", help="internal: run this one row in this process")
    args = ap.parse_args()
    args.json = args.json or "unsloth_whisper_peer.json"
    if args.row:
        return side(args)
    if args.prepare:
        from recipe_trainer_e2e import prepare

        return prepare(Path(args.processor), args.tiny)
    info = C.start(args)
    checkpoint(Path(args.processor), args.tiny)  # weights built once, before the row processes
    rows = []
    for name, who, _opts in ROWS:
        if not C.selected(name, args):
            continue
        extra = [a for a in sys.argv[1:] if a in ("--tiny",)] + ["--warmup", str(args.warmup), "--steps", str(args.steps),
                                                                  "--processor", args.processor]
        env = dict(os.environ)
        if who == "unsloth" and args.unsloth_path:
            env["PYTHONPATH"] = os.pathsep.join([args.unsloth_path, env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, __file__, "--row", name, *extra], env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if proc.returncode or not lines:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
            print(f"{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", flush=True)
            rows.append(dict(row=name, side=who, error=err, stderr_tail=proc.stderr[-6000:], stdout_tail=proc.stdout[-2000:]))
        else:
            rows.append(json.loads(lines[-1][4:]))
        C.write_json(args.json, dict(versions=info, args=vars(args), rows=rows))
    base = next((r.get("samples_s") for r in rows if r.get("side") == "loratune" and r.get("samples_s")), None)
    C.add_ratio(rows, "samples_s", base, "x_loratune")
    C.write_json(args.json, dict(versions=info, args=vars(args), rows=rows))
    C.print_table(f"Whisper large-v3-turbo LoRA, batch 8 x 30 s ({info['device']})", rows,
                  ["row", "samples_s", "x_loratune", "peak_gib", "reserved_gib", "trainable_params", "loss", "error"])


if __name__ == "__main__":
    main()
