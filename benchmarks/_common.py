"""Shared pieces of the benchmark scripts: random full-size models, timing, memory, tables.

Not a benchmark itself; each ``benchmarks/*_speed.py`` imports it. Models are built from a config
with random weights (speed and memory do not depend on the values), saved once to a scratch folder
(``/dev/shm`` when it exists) and loaded back through ``from_pretrained`` so that quantisation goes
through exactly the code path a real checkpoint takes.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing

GiB = 1024**3


def quiet() -> None:
    """Keep transformers' per-call warnings (max_length vs max_new_tokens ...) out of the tables."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")  # once per layer per step otherwise
    warnings.filterwarnings("ignore", category=FutureWarning)


def scratch_dir() -> Path:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    path = base / "loratune-bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or REPO / "outputs" / "bench")
    path.mkdir(parents=True, exist_ok=True)
    return path


def versions() -> Dict[str, str]:
    quiet()
    info = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "peft", "bitsandbytes", "accelerate", "liger_kernel"):
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except Exception:  # not installed here: say so in the table header
            info[name] = "-"
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda or "?"
    else:
        info["device"] = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return info


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GiB if torch.cuda.is_available() else float("nan")


def peak_reserved_gib() -> float:
    return torch.cuda.max_memory_reserved() / GiB if torch.cuda.is_available() else float("nan")


def time_steps(step: Callable[[], None], warmup: int, steps: int, pipelined: bool = False) -> List[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed ones.

    Default: the device is synchronised after every step (the issue's method: median of single
    steps). ``pipelined``: the steps run back to back and only the end is synchronised, as in the
    Trainer's loop (it reads no value from the GPU between logging steps, so the CPU queues the next
    step while the GPU still runs this one); every step is then reported as the mean.
    """
    for _ in range(warmup):
        step()
    sync()
    if pipelined:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return [(time.perf_counter() - t0) / steps] * steps
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def median(xs: List[float]) -> float:
    return statistics.median(xs)


def autocast(dtype: Optional[torch.dtype]):
    """Mixed precision like Trainer's fp16/bf16 flags; None = no autocast (the tutorial's 4-bit run)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device().type, dtype=dtype)


def sdpa_backend(name: Optional[str]):
    """Force one scaled-dot-product-attention backend (``cudnn``, ``flash``, ``efficient``); None = default."""
    if not name:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return sdpa_kernel([table[name]])


def reset_sdpa() -> None:
    """Undo a process-wide ``model.sdpa_backend`` choice of an earlier row (all fused kernels allowed)."""
    if torch.cuda.is_available():
        for name in ("cudnn", "flash", "mem_efficient"):
            getattr(torch.backends.cuda, f"enable_{name}_sdp")(True)


def save_random(model_cls, config, name: str, dtype: torch.dtype) -> Path:
    """Build ``model_cls(config)`` with random weights in ``dtype`` and save it once; return its folder."""
    path = scratch_dir() / name
    if (path / "config.json").is_file():
        return path
    torch.manual_seed(0)
    ctx = torch.device("cuda") if torch.cuda.is_available() else nullcontext()
    with ctx:
        model = model_cls(config).to(dtype)
    model.save_pretrained(path)
    del model
    reset_memory()
    return path


def free(*objs) -> None:
    for o in objs:
        del o
    reset_memory()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def print_table(title: str, rows: List[Dict], columns: List[str]) -> str:
    """Markdown table of ``rows`` (dicts) restricted to ``columns``; printed and returned."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = [f"\n### {title}", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_json(name: str, payload) -> Path:
    path = out_dir() / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)
    return path


# --- the row loop every benchmark script shares -------------------------------------------------


def bench_parser(doc: str, warmup: int = 3, steps: int = 12):
    """Arguments every benchmark takes: row selection, step counts, CPU rehearsal, profiling."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    # ';' separates, since row names hold commas (runs 1-8 in RESULTS.md split on commas)
    ap.add_argument("--skip", default="", help="';'-separated substrings: leave out rows whose name has one")
    ap.add_argument("--rows", default="", help="';'-separated substrings: run only rows whose name has one")
    ap.add_argument("--warmup", type=int, default=warmup, help="untimed steps before timing")
    ap.add_argument("--steps", type=int, default=steps, help="timed steps (median reported)")
    ap.add_argument("--tiny", action="store_true", help="tiny architecture: a CPU rehearsal of the code path")
    ap.add_argument("--pipelined", action="store_true", help="no synchronisation between timed steps (as the Trainer runs)")
    ap.add_argument("--profile", action="store_true", help="after timing a row, profile 2 steps: top GPU kernels, busy share")
    ap.add_argument("--launch", action="store_true", help="after timing a row: CPU launch time vs synchronised step, hidden syncs")
    ap.add_argument("--json", default=None, help="result file name under $OUT (default: <script>.json)")
    return ap


def start(args) -> Dict[str, str]:
    """CPU thread cap (the 2-core machine), versions printed once; returns the versions dict."""
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    info = versions()
    print("versions:", info, flush=True)
    return info


def selected(name: str, args) -> bool:
    if any(s and s in name for s in args.skip.split(";")):
        return False
    return not args.rows or any(s and s in name for s in args.rows.split(";"))


def run_rows(variants, name_of: Callable, run_one: Callable, json_name: str, info, args, base_row: Callable) -> List[Dict]:
    """Run every selected variant; one failure (OOM, compile error) becomes an ``error`` row and the
    others still run. The JSON under $OUT is rewritten after each row, so a run cut off by its time
    limit keeps what it measured."""
    rows = []
    for v in variants:
        name = name_of(v)
        if not selected(name, args):
            continue
        t0 = time.time()
        try:
            row = run_one(v)
        except Exception as exc:
            if not is_oom(exc):
                import traceback

                traceback.print_exc()
            row = dict(base_row(v), error=f"{type(exc).__name__}: {str(exc)[:160]}")
            reset_memory()
        row["wall_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(row, flush=True)
        write_json(args.json or json_name, dict(versions=info, args=vars(args), rows=rows))
    return rows


def add_ratio(rows: List[Dict], key: str, base: Optional[float], column: str) -> None:
    """``column`` = row[key] / base for every row that has ``key`` (the "x recipe" columns)."""
    for r in rows:
        if base and r.get(key):
            r[column] = r[key] / base


def launch_check(step: Callable[[], None], steps: int = 5) -> Dict:
    """Is a step bound by the CPU? ``launch_ms``: time until ``step()`` returns (kernels queued, not
    run); ``synced_ms``: until the GPU has finished. Launch close to synced = the GPU waits on the
    CPU (fewer/cheaper launches pay, CUDA graphs); far below = GPU-bound. ``syncs``: operations that
    made the CPU wait for the GPU inside one step (``torch.cuda.set_sync_debug_mode``)."""
    import warnings

    launch, synced = [], []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        t1 = time.perf_counter()
        sync()
        launch.append(t1 - t0)
        synced.append(time.perf_counter() - t0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        sync()
    # where: the Python line that called the synchronising operation
    msgs = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    out = dict(launch_ms=median(launch) * 1e3, synced_ms=median(synced) * 1e3, syncs=len(msgs), sync_at=", ".join(sorted(set(msgs))))
    print(f"launch check: {out['launch_ms']:.1f} ms to queue a step, {out['synced_ms']:.1f} ms to finish it, {out['syncs']} syncs", flush=True)
    return out


def profile(step: Callable[[], None], steps: int = 2, top: int = 15) -> Dict:
    """Profile ``steps`` calls of ``step`` (already warm): the top GPU kernels by total time and
    the share of the wall time the GPU was busy (a low share means CPU/launch overhead)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    sync()
    t0 = time.perf_counter()
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync()
    wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if getattr(e, "device_time_total", 0) > 0 and e.device_type.name == "CUDA"]
    busy = sum(e.device_time_total for e in events) / 1e6
    events.sort(key=lambda e: e.device_time_total, reverse=True)
    kernels = [dict(name=e.key[:90], ms_per_step=e.device_time_total / 1e3 / steps, calls_per_step=e.count / steps,
                     share=e.device_time_total / 1e6 / busy if busy else 0) for e in events[:top]]
    out = dict(wall_ms_per_step=wall * 1e3 / steps, gpu_busy_ms_per_step=busy * 1e3 / steps, busy_share=busy / wall, kernels=kernels)
    print(f"profile: {out['wall_ms_per_step']:.1f} ms/step wall, GPU busy {out['gpu_busy_ms_per_step']:.1f} ms ({out['busy_share']:.0%})")
    for k in kernels:
        print(f"  {k['ms_per_step']:8.2f} ms {k['share']:6.1%} x{k['calls_per_step']:.0f}  {k['name']}")
    return out
