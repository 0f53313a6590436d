"""Text evaluation of causal LMs (``task: sft``): chrF and BLEU of generations vs references.

    loratune evaluate configs/gemma3-270m-hsk-zh-en-lora.yaml model.adapter=outputs/gemma3-270m-hsk-zh-en-lora
    loratune evaluate configs/gemma3-270m-hsk-zh-en-lora.yaml eval.limit=100 eval.compare_base=false model.adapter=DIR

Generates answers for the held-out split (``data.eval_split``, or the seeded ``data.eval_ratio``
cut) with the base model and, given ``model.adapter``, with the adapter too — one model load,
the adapter switched off for the base pass (``eval.compare_base``). Scores with sacrebleu
(corpus chrF and BLEU, sentence chrF per example) and writes ``metrics.json`` and
``examples.csv`` (worst first) to ``eval.output_dir`` (default ``<adapter or train.output_dir>/eval``).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import List

from loratune.config import RunConfig
from loratune.core.atomic import write_json, write_text
from loratune.core.model_card import add_evaluation

log = logging.getLogger(__name__)


def score(hypotheses: List[str], references: List[str]) -> dict:
    import sacrebleu

    return {
        "chrf": round(sacrebleu.corpus_chrf(hypotheses, [references]).score, 2),
        "bleu": round(sacrebleu.corpus_bleu(hypotheses, [references]).score, 2),
    }


def _generate_all(model, tokenizer, prompts, cfg: RunConfig, template: str) -> List[str]:
    from loratune.llm.generation import generate_batch

    answers: List[str] = []
    bs = cfg.eval.batch_size
    for i in range(0, len(prompts), bs):
        answers += generate_batch(model, tokenizer, prompts[i : i + bs], cfg, template, cfg.eval.max_new_tokens)
        log.info("generated %d / %d", len(answers), len(prompts))
    return answers


def _write_csv(path: Path, rows: List[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def evaluate(cfg: RunConfig) -> dict:
    """Score base and/or adapter on the held-out split; returns the metrics written to metrics.json."""
    import sacrebleu
    import torch

    from loratune.llm.data import eval_pairs, resolve_template
    from loratune.llm.model import load_causal_lm, load_tokenizer

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    start = time.time()
    pairs = eval_pairs(cfg)  # data errors before the model loads
    tokenizer = load_tokenizer(cfg)
    template = resolve_template(tokenizer, cfg.sft, cfg.model.name)
    model = load_causal_lm(cfg, adapter=cfg.model.adapter)
    prompts = [p for p, _ in pairs]
    refs = [r.strip() for _, r in pairs]
    runs = {}
    if not cfg.model.adapter or cfg.eval.compare_base:
        t = time.time()
        with model.disable_adapter() if cfg.model.adapter else nullcontext():
            runs["base"] = (_generate_all(model, tokenizer, prompts, cfg, template), time.time() - t)
    if cfg.model.adapter:
        t = time.time()
        runs["adapter"] = (_generate_all(model, tokenizer, prompts, cfg, template), time.time() - t)

    metrics = {"model": cfg.model.name, "adapter_dir": cfg.model.adapter, "examples": len(pairs),
               "split": cfg.data.eval_split or f"seeded {cfg.data.eval_ratio:.0%} cut", "template": template}
    for name, (hyps, secs) in runs.items():
        metrics[name] = {**score(hyps, refs), "generation_seconds": round(secs, 1)}
        log.info("%s: chrF %.2f  BLEU %.2f  (%d examples, %.0f s)", name, metrics[name]["chrf"], metrics[name]["bleu"], len(refs), secs)
    if "base" in runs and "adapter" in runs:
        metrics["chrf_gain"] = round(metrics["adapter"]["chrf"] - metrics["base"]["chrf"], 2)
    metrics["wall_seconds"] = round(time.time() - start, 1)

    rows = []
    for i, (prompt, ref) in enumerate(zip(prompts, refs)):
        row = {"prompt": prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False), "reference": ref}
        for name, (hyps, _) in runs.items():
            row[name] = hyps[i]
            row[f"chrf_{name}"] = round(sacrebleu.sentence_chrf(hyps[i], [ref]).score, 2)
        rows.append(row)
    key = "chrf_adapter" if "adapter" in runs else "chrf_base"
    rows.sort(key=lambda r: r[key])  # worst first: where to look

    out = Path(cfg.eval.output_dir or Path(cfg.model.adapter or cfg.train.output_dir) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        _write_csv(out / "examples.csv", rows)
    write_json(out / "metrics.json", metrics)
    if cfg.model.adapter:  # the adapter's model card gets the scores (before/after when compared)
        add_evaluation(cfg.model.adapter, ["| evaluation | chrF | BLEU |", "|---|---|---|"] + [
            f"| {name} on {metrics['split']} ({len(refs)} examples) | {metrics[name]['chrf']:.2f} | {metrics[name]['bleu']:.2f} |"
            for name in runs])
    log.info("wrote %s and %s", out / "metrics.json", out / "examples.csv")
    print(json.dumps(metrics, indent=2, ensure_ascii=False))
    return metrics
