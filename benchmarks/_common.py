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
    from transformers.utils import logging

    import warnings

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


def time_steps(step: Callable[[], None], warmup: int, steps: int) -> List[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed ones (device synchronised)."""
    for _ in range(warmup):
        step()
    sync()
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
