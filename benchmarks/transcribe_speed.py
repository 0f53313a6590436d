"""Transcription speed and CER: loratune's backends against plain faster-whisper, in one run (issue 15).

    PYTHONPATH=src HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/transcribe_speed.py \
        --adapter outputs/whisper-base-hsk-qlora --clips 200 --threads 2 --out benchmarks/results/transcribe_speed_cpu.json

Short clips: ``--clips`` HSK dev rows (seeded pick) through
  * loratune ctranslate2, trimmed input (the adapter's short-clip mode; what ``loratune transcribe`` runs),
  * loratune ctranslate2, padded 30-s input (the CER reference for trimming),
  * faster-whisper ``WhisperModel.transcribe`` clip by clip on the *same* CT2 copy (= ``loratune export``
    of the adapter at int8), beam 1, language zh, otherwise its defaults,
  * loratune transformers, trimmed (the recipe's base + adapter, the previous ``transcribe`` path).
The clips are cut into ``--rounds`` chunks and the systems take turns on each chunk (order rotated),
so a load change on the shared CPU hits all of them alike; clips/s = clips / summed seconds.
Long files: dev clips joined (0.5 s gaps) into a ~29-s and a ~120-s file, each decoded ``--repeats``
times per system, alternating; real-time factor = median seconds / audio seconds. faster-whisper
gets the decoding options loratune's long-form path uses (beam 1, temperature 0, no conditioning on
the previous window), so the transcripts can be compared for equality. Over 30 s every
``transcribe.long_form`` mode runs; the default for a short-clip adapter is ``vad`` (asr/longform.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
SR = 16000


def dev_rows(data_dir: Path, n: int, seed: int):
    rows = [r for r in csv.DictReader(open(data_dir / "metadata.csv", encoding="utf-8-sig")) if r["split"] == "dev"]
    random.Random(seed).shuffle(rows)
    return rows[:n] if n else rows


def joined(audios, texts, seconds: float):
    """Clips + 0.5-s gaps up to ``seconds`` of audio -> (audio, reference text)."""
    gap = np.zeros(SR // 2, np.float32)
    parts, refs, total = [], [], 0
    for a, t in zip(audios, texts):
        if total + len(a) + len(gap) > seconds * SR:
            break
        parts += [a, gap]
        refs.append(t)
        total += len(a) + len(gap)
    return np.concatenate(parts), "".join(refs)


def fw_text(model, audio, **opts) -> str:
    segments, _ = model.transcribe(audio, language="zh", beam_size=1, **opts)
    return "".join(s.text.strip() for s in segments)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", default=str(REPO / "outputs/whisper-base-hsk-qlora"))
    p.add_argument("--recipe", default=str(REPO / "configs/whisper-base-hsk-qlora.yaml"))
    p.add_argument("--data", default=str(REPO.parent / "shared/datasets/hsk-zh"))
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip", default="", help="comma-separated systems to leave out: transformers,padded,long")
    p.add_argument("--out", default=str(REPO / "benchmarks/results/transcribe_speed_cpu.json"))
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import torch
    from faster_whisper import WhisperModel

    from loratune.asr.ct2_transcriber import CT2Transcriber
    from loratune.asr.transcriber import Transcriber
    from loratune.config import load_config
    from loratune.console import quiet_libraries
    from loratune.core.audio import load_audio
    from loratune.core.metrics import score

    quiet_libraries()
    torch.set_num_threads(args.threads)
    rows = dev_rows(Path(args.data), args.clips, args.seed)
    audios = [load_audio(Path(args.data) / "audio" / r["ID"]) for r in rows]
    refs = [r["sentence"] for r in rows]
    common = [f"model.adapter={args.adapter}", "whisper.language=zh", f"transcribe.cpu_threads={args.threads}", "transcribe.batch_size=16",
              "whisper.num_beams=1"]  # greedy, as issue 15's protocol and faster-whisper's rows (the recipe evaluates with beam 5)
    cfg = load_config(args.recipe, common)
    systems = {"loratune ctranslate2 int8, trimmed": CT2Transcriber.from_config(cfg)}
    model_dir = systems["loratune ctranslate2 int8, trimmed"].model_dir
    if "padded" not in skip:
        systems["loratune ctranslate2 int8, padded 30 s"] = CT2Transcriber.from_config(load_config(args.recipe, common + ["whisper.trim_audio=false"]))
    fw = WhisperModel(model_dir, device="cpu", compute_type="int8", cpu_threads=args.threads)
    systems["faster-whisper 1.2.1 int8 (same CT2 copy), beam 1"] = lambda batch, **_: [type("T", (), {"text": fw_text(fw, a)}) for a in batch]
    if "transformers" not in skip:
        systems["loratune transformers (recipe base + adapter), trimmed"] = Transcriber.from_config(cfg)
    budget = cfg.whisper.generation_max_length

    hyps = {name: [""] * len(audios) for name in systems}
    seconds = {name: 0.0 for name in systems}
    chunks = np.array_split(np.arange(len(audios)), args.rounds)
    names = list(systems)
    for r, chunk in enumerate(chunks):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            t = systems[name]
            order = sorted(chunk, key=lambda i: len(audios[i]))  # length-grouped batches (evaluate does this too)
            start = time.perf_counter()
            for b in range(0, len(order), 16):
                idx = order[b : b + 16]
                for i, out in zip(idx, t([audios[i] for i in idx], max_new_tokens=budget)):
                    hyps[name][i] = out.text
            seconds[name] += time.perf_counter() - start
        print(f"round {r + 1}/{len(chunks)}: " + ", ".join(f"{n.split(',')[0][:24]} {seconds[n]:.1f}s" for n in names), flush=True)
    fw_name = names[2] if "padded" not in skip else names[1]
    short = []
    for name in names:
        cer, items = score(refs, hyps[name], "cer", "zh")
        short.append({"system": name, "clips": len(audios), "seconds": round(seconds[name], 2),
                      "clips_per_second": round(len(audios) / seconds[name], 2), "cer": round(cer, 4),
                      "errors": sum(s.counts.errors for s in items), "ref_units": sum(s.counts.ref_len for s in items),
                      "x_faster_whisper": round(seconds[fw_name] / seconds[name], 2)})

    long_rows = []
    if "long" not in skip:
        ct2 = systems[names[0]]
        for target in (29.0, 120.0):
            audio, ref = joined(audios, refs, target)
            dur = len(audio) / SR
            opts = dict(condition_on_previous_text=False, temperature=0.0)
            def mode(name, a=audio):
                def run():
                    saved, ct2.long_form = ct2.long_form, name
                    try:
                        return ct2([a])[0].text
                    finally:
                        ct2.long_form = saved
                return run

            runs = {f"loratune ctranslate2 int8 (default{', long_form=' + ct2.long_form if dur > 30 else ''})": mode(ct2.long_form),
                    "faster-whisper 1.2.1 int8": lambda a=audio: fw_text(fw, a, **opts)}
            if dur > 30:
                for name in ("sequential", "batched", "vad"):
                    if name != ct2.long_form:
                        runs[f"loratune ctranslate2 int8, long_form={name}"] = mode(name)
            times = {n: [] for n in runs}
            texts = {}
            for rep in range(args.repeats):
                for n in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
                    start = time.perf_counter()
                    texts[n] = runs[n]()
                    times[n].append(time.perf_counter() - start)
            fw_med = statistics.median(times["faster-whisper 1.2.1 int8"])
            for n in runs:
                med = statistics.median(times[n])
                long_rows.append({"file_seconds": round(dur, 1), "system": n, "median_seconds": round(med, 2),
                                  "rtf": round(med / dur, 4), "x_faster_whisper": round(fw_med / med, 2),
                                  "cer": round(score([ref], [texts[n]], "cer", "zh")[0], 4),
                                  "same_text_as_faster_whisper": texts[n] == texts["faster-whisper 1.2.1 int8"]})
            print(f"{dur:.0f}-s file done", flush=True)

    report = {"threads": args.threads, "clips": len(audios), "seed": args.seed, "adapter": args.adapter,
              "ct2_model": model_dir, "short": short, "long": long_rows, "note": "CPU shared with a training job"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print("\n| system | clips/s | CER | × faster-whisper |\n|---|---|---|---|")
    for r in short:
        print(f"| {r['system']} | {r['clips_per_second']} | {r['cer']:.4f} | {r['x_faster_whisper']} |")
    print("\n| file | system | RTF | × faster-whisper | CER | same text as faster-whisper |\n|---|---|---|---|---|---|")
    for r in long_rows:
        print(f"| {r['file_seconds']} s | {r['system']} | {r['rtf']} | {r['x_faster_whisper']} | {r['cer']:.4f} | {r['same_text_as_faster_whisper']} |")


if __name__ == "__main__":
    main()
