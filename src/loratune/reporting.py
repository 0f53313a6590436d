"""End-of-training artefacts: loss-per-epoch curves + PNG, ``summary.json`` and the printed summary.

    from loratune.reporting import epoch_losses, plot_losses, write_json, peak_memory_gb
    curves = epoch_losses(trainer.state.log_history)    # {"epoch": [...], "train": [...], "valid": [...]}
    plot_losses(curves, out / "loss.png")
"""
from __future__ import annotations

import json
import math
import os
import resource
import tempfile
from pathlib import Path
from typing import Any, Dict, List


def epoch_losses(log_history: List[Dict[str, Any]]) -> Dict[str, List[float]]:
    """Mean logged training loss per epoch and the validation loss at each epoch's last evaluation."""
    train: Dict[int, List[float]] = {}
    valid: Dict[int, float] = {}
    for entry in log_history:
        epoch = entry.get("epoch")
        if epoch is None:
            continue
        bucket = max(1, math.ceil(round(epoch, 6)))  # steps inside epoch k (0, k] belong to epoch k
        if "loss" in entry:
            train.setdefault(bucket, []).append(float(entry["loss"]))
        if "eval_loss" in entry:
            valid[bucket] = float(entry["eval_loss"])
    epochs = sorted(set(train) | set(valid))
    return {
        "epoch": epochs,
        "train": [sum(train[e]) / len(train[e]) if e in train else None for e in epochs],
        "valid": [valid.get(e) for e in epochs],
    }


def _atomic_target(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    return tmp


def plot_losses(curves: Dict[str, List[float]], path: Path, title: str = "loss per epoch") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, marker in (("train", "o"), ("valid", "s")):
        pts = [(e, v) for e, v in zip(curves["epoch"], curves[name]) if v is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = _atomic_target(path)
    fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_json(obj: Any, path: Path) -> Path:
    path = Path(path)
    tmp = _atomic_target(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, ensure_ascii=False, indent=2)
    os.replace(tmp, path)
    return path


def peak_memory_gb() -> Dict[str, float]:
    """Peak GPU memory allocated by PyTorch (when CUDA) and the process's peak resident memory."""
    out = {"peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)}  # KiB on Linux
    try:
        import torch

        if torch.cuda.is_available():
            out["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    except ImportError:
        pass
    return out


def format_summary(summary: Dict[str, Any]) -> str:
    keys = ["output_dir", "best_metric", "best_epoch", "epochs_run", "global_step", "resumed_from_step", "wall_time_s",
            "train_samples_per_second", "peak_rss_gb", "peak_gpu_gb", "trainable_params", "total_params",
            "footprint_gb_base", "footprint_gb_with_adapters", "skipped_rows", "feature_cache_hit"]
    width = max(map(len, keys))
    lines = ["training summary"] + [f"  {k:<{width}}  {summary[k]}" for k in keys if summary.get(k) is not None]
    return "\n".join(lines)
