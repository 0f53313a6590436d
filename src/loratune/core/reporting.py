"""End-of-training artefacts: loss curves (per epoch in summary.json, per step in loss.png), the
steady-speed timer, memory peaks and the printed summary (both wings, through core.training).

    from loratune.core.reporting import epoch_losses, plot_losses
    curves = epoch_losses(trainer.state.log_history)    # {"epoch": [...], "train": [...], "valid": [...]}
    plot_losses(trainer.state.log_history, out / "loss.png")
"""
from __future__ import annotations

import math
import resource
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


def plot_losses(log_history: List[Dict[str, Any]], path: Path, title: str = "loss") -> Path:
    """Training loss per logged step, with the evaluation points on the same axis (both tasks)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers / CI
    import matplotlib.pyplot as plt

    from loratune.core.atomic import replacing

    path = Path(path)
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss (per logged step)")
    if evals:
        ax.plot(*zip(*evals), "s-", label="validation loss")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    plt.close(fig)
    return path


def step_timer(warmup_steps: int = 5):
    """A Trainer callback measuring steady training speed for ``summary.json``.

    It times consecutive optimiser steps (end to end, data loading included), leaving out the first
    ``warmup_steps`` (compilation, kernel autotuning, allocator growth) and every interval that held
    an evaluation or a checkpoint save; ``timer.report(samples_per_step)`` gives the median step
    time and examples (clips / sequences) per second, the mean over the same steps, and the steps
    that stalled (over 3x the median: e.g. compiling for a new shape). The Trainer's own
    ``train_samples_per_second`` averages over the whole run, warm-up and evaluations included.
    """
    import time

    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.last, self.dirty, self.intervals = None, False, []
            self.first_step_unix = None  # wall clock at the end of the first optimiser step (time to first step)

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.first_step_unix is None:
                self.first_step_unix = time.time()
            if self.last is not None and not self.dirty and state.global_step > warmup_steps:
                self.intervals.append(now - self.last)
            self.last, self.dirty = now, False

        def on_evaluate(self, args, state, control, **kwargs):
            self.dirty = True

        def on_save(self, args, state, control, **kwargs):
            self.dirty = True

        def report(self, samples_per_step: int) -> Dict[str, Any]:
            first = {"first_step_unix": round(self.first_step_unix, 3)} if self.first_step_unix else {}
            if not self.intervals:
                return first
            xs = sorted(self.intervals)
            median = xs[len(xs) // 2]
            stalls = [x for x in xs if x > 3 * median]  # recompilation for a new shape, a slow batch ...
            return {**first, "steady_step_s": round(median, 4), "steady_samples_per_second": round(samples_per_step / median, 2),
                    "mean_samples_per_second_after_warmup": round(samples_per_step * len(xs) / sum(xs), 2),
                    "steady_steps_timed": len(xs), "stalled_steps": len(stalls), "stalled_seconds": round(sum(stalls), 1)}

    return StepTimer()


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
            "train_samples_per_second", "steady_samples_per_second", "peak_rss_gb", "peak_gpu_gb", "trainable_params", "total_params",
            "footprint_gb_base", "footprint_gb_with_adapters", "skipped_rows", "feature_cache_hit"]
    width = max(map(len, keys))
    lines = ["training summary"] + [f"  {k:<{width}}  {summary[k]}" for k in keys if summary.get(k) is not None]
    return "\n".join(lines)
