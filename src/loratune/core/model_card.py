"""The README.md written beside every adapter: a model card a person can read and share.

It replaces PEFT's template ("[More Information Needed]") with what loratune knows: the base
model's public id, task, data, recipe (LoRA, quantisation, schedule), training time and losses,
and how to use the adapter. ``loratune evaluate`` adds its before/after scores to the same card.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

from loratune.core.atomic import write_text

EVAL_START = "<!-- loratune evaluate -->"
EVAL_END = "<!-- /loratune evaluate -->"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def _data_line(cfg) -> str:
    d = cfg.data
    source = d.csv or d.jsonl or d.hub or d.disk or "?"
    parts = [f"`{source}`"]
    if d.csv and d.audio_dir:
        parts.append(f"audio `{d.audio_dir}`")
    if d.eval_split:
        parts.append(f"train split `{d.train_split}`, evaluation split `{d.eval_split}` (column `{d.split_column}`)")
    if d.max_train_samples:
        parts.append(f"{d.max_train_samples} training rows drawn with seed {d.seed}")
    return ", ".join(parts)


def model_card(cfg, summary: Dict[str, Any], notes: Optional[List[str]] = None) -> str:
    base = summary.get("base_model") or cfg.model.name
    t, lora, q = cfg.train, cfg.lora, cfg.quant
    quant = f"{q.bits}-bit ({q.quant_type}{', double-quant' if q.double_quant and q.bits == 4 else ''})" if q.bits else "none"
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: peft",
        f"pipeline_tag: {'automatic-speech-recognition' if cfg.task == 'asr' else 'text-generation'}",
        "tags: [loratune, lora" + (", qlora" if q.bits else "") + "]",
        "---",
        "",
        f"# LoRA adapter for `{base}` ({'speech recognition' if cfg.task == 'asr' else 'supervised fine-tuning'})",
        "",
        "Trained with loratune (`loratune train`); `loratune_config.yaml` beside this card is the whole recipe.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}` |",
        f"| data | {_data_line(cfg)} |",
        f"| examples | {_fmt(summary.get('train_examples'))} train / {_fmt(summary.get('eval_examples'))} evaluation"
        f" ({_fmt(summary.get('skipped_rows'))} rows skipped) |",
        f"| LoRA | r {lora.r}, alpha {lora.alpha}, dropout {lora.dropout}, on {', '.join(lora.target_modules)} |",
        f"| base quantisation | {quant} |",
        f"| schedule | {t.epochs:g} epochs (max_steps {t.max_steps}), batch {t.batch_size} x {t.grad_accum} accumulation, "
        f"lr {t.lr:g} {t.scheduler} |",
        f"| steps run | {_fmt(summary.get('global_step'))} ({_fmt(summary.get('epochs_run'))} epochs) |",
        f"| training time | {_fmt(summary.get('wall_time_s'))} s, {_fmt(summary.get('train_samples_per_second'))} samples/s |",
        f"| final train loss / eval loss | {_fmt(summary.get('train_loss'))} / {_fmt(summary.get('eval_loss'))} |",
        f"| best checkpoint ({t.metric_for_best_model}) | {_fmt(summary.get('best_metric'))} |",
        *(notes or []),
        "",
        EVAL_START,
        "Not evaluated yet: `loratune evaluate RECIPE model.adapter=THIS_FOLDER` scores base and adapter and writes the result here.",
        EVAL_END,
        "",
        "## Use",
        "",
        "```bash",
        f"loratune {'transcribe AUDIO' if cfg.task == 'asr' else 'generate'} model.name={base} model.adapter=THIS_FOLDER",
        f"loratune merge model.name={base} model.adapter=THIS_FOLDER   # a standalone model",
        "```",
        "",
        "`loss.png` plots the training loss per logged step with the evaluation points; `summary.json` holds every number above.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(cfg, summary: Dict[str, Any], out: Path, notes: Optional[List[str]] = None) -> Path:
    return write_text(Path(out) / "README.md", model_card(cfg, summary, notes))


def add_evaluation(adapter_dir: str | Path, rows: List[str]) -> Optional[Path]:
    """Put ``rows`` (markdown lines) between the card's evaluation markers; None without a card."""
    card = Path(adapter_dir) / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8")
    if EVAL_START not in text or EVAL_END not in text:
        return None
    head, rest = text.split(EVAL_START, 1)
    _, tail = rest.split(EVAL_END, 1)
    return write_text(card, head + EVAL_START + "\n" + "\n".join(rows) + "\n" + EVAL_END + tail)
