"""Cost curves of the data modes: time to first step, disk, peak RSS and steady speed vs corpus size (CPU).

    python benchmarks/data_scale.py build --root /tmp/data_scale --sizes 1000,10000,100000   # synthetic shards
    python benchmarks/data_scale.py run --root /tmp/data_scale --sizes 1000,10000 --modes stream,audio,log_mel
    python benchmarks/data_scale.py run --root /tmp/data_scale --sizes 100000 --modes stream

``build`` writes, per size, parquet shards of 1000 short clips (1-2 s tone + noise, FLAC, random
Chinese-character transcripts; ``tests/synthetic_clips.py``) and the tiny random Whisper of the tests
(``tests/tiny.py``), so the numbers measure the data path, not the model. ``run`` trains each
(size, mode) in a fresh ``loratune train`` process for ``--steps`` steps of batch 8, evaluation off:

* ``log_mel`` / ``audio``: the cached modes (``data.features``), built cold into a fresh cache folder;
* ``stream``: ``data.streaming=true`` (nothing cached; shuffle buffer 1000).

Reported per run: seconds from process start to the end of the first optimiser step (``summary.json``'s
``first_step_unix``), the cache's size on disk, the process's peak RSS (``wait4``), and steady
samples/s (median step after 5 warm-up steps). Rows go to ``--json`` (default ``outputs/bench/data_scale.json``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def build(root: Path, sizes) -> None:
    from synthetic_clips import write_shards
    from tiny import make_tiny_whisper

    if not (root / "tiny" / "config.json").is_file():
        make_tiny_whisper(root / "tiny")
    for n in sizes:
        folder = root / f"corpus-{n}"
        if folder.is_dir() and len(list(folder.glob("*.parquet"))) == -(-n // 1000):
            continue
        t = time.time()
        write_shards(folder, n, shard_rows=1000, seed=n)
        print(f"{n} clips: {du(folder) / 1e6:.0f} MB in {time.time() - t:.0f} s", flush=True)


def run_one(root: Path, n: int, mode: str, steps: int) -> dict:
    work = root / "runs" / f"{mode}-{n}"
    shutil.rmtree(work, ignore_errors=True)
    overrides = [f"model.name={root / 'tiny'}", f"data.parquet={root / f'corpus-{n}'}/*.parquet", "data.eval_ratio=0.01",
                 f"train.max_steps={steps}", "train.batch_size=8", "train.eval_strategy=no", "train.report_to=[none]",
                 "train.logging_steps=5", "train.threads=1", "whisper.trim_audio=true", "train.warmup_steps=0",
                 # a few generated FLAC clips that libsndfile wrote and reads are refused by FFmpeg's decoder
                 # (PyAV: InvalidDataError; clip009814 of the 100k corpus): counted, not fatal
                 "data.skip_bad_rows=true",
                 f"train.output_dir={work / 'out'}", f"data.cache_dir={work / 'cache'}"]
    if mode == "stream":
        overrides += ["data.streaming=true", "data.shuffle_buffer=1000"]
    else:
        overrides += [f"data.features={mode}"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    work.parent.mkdir(parents=True, exist_ok=True)
    log = work.parent / f"{mode}-{n}.log"
    started = time.time()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "loratune", "train", *overrides], env=env, stdout=err, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    if status != 0:
        raise SystemExit(f"{mode} {n}: loratune train failed (status {status}); see {log}")
    summary = json.loads((work / "out" / "summary.json").read_text())
    return {"clips": n, "mode": mode, "corpus_mb": round(du(root / f"corpus-{n}") / 1e6, 1),
            "time_to_first_step_s": round(summary["first_step_unix"] - started, 1),
            "cache_mb": round(du(work / "cache") / 1e6, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 0),
            "steady_samples_per_second": summary.get("steady_samples_per_second"), "steps": summary["global_step"],
            "skipped_rows": summary.get("skipped_rows")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["build", "run"])
    ap.add_argument("--root", type=Path, default=Path("/tmp/data_scale"))
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--modes", default="stream,audio,log_mel")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--json", type=Path, default=REPO / "outputs" / "bench" / "data_scale.json")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.what == "build":
        return build(args.root, sizes)
    rows = json.loads(args.json.read_text()) if args.json.is_file() else []
    print("| clips | mode | corpus MB | time to first step s | cache MB | peak RSS MB | steady samples/s |\n|---|---|---|---|---|---|---|")
    for n in sizes:
        for mode in args.modes.split(","):
            r = run_one(args.root, n, mode, args.steps)
            rows = [x for x in rows if (x["clips"], x["mode"]) != (n, mode)] + [r]
            print(f"| {n:,} | {mode} | {r['corpus_mb']} | {r['time_to_first_step_s']} | {r['cache_mb']} | {r['peak_rss_mb']:.0f} "
                  f"| {r['steady_samples_per_second']} |", flush=True)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
