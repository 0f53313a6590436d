"""``loratune generate``: answers from a causal LM (+ adapter, or a merged model directory).

    loratune generate configs/gemma3-270m-hsk-zh-en-lora.yaml model.adapter=outputs/gemma3-270m-hsk-zh-en-lora \\
        prompt="我喜欢喝茶。"
    loratune generate RECIPE.yaml model.adapter=DIR generate.prompts_file=prompts.txt   # one prompt a line
    loratune generate RECIPE.yaml model.adapter=DIR                                      # interactive chat
    loratune generate model.name=outputs/merged generate.do_sample=true generate.temperature=0.8 prompt="Hi"

Prompts are rendered exactly as in training (``sft.template``, ``sft.prompt_format``,
``sft.system_prompt``): the tokenizer's chat template when the model has one, else the instruction
template. ``generate.*`` holds the decoding options (``loratune generate --help``). With a chat
template the interactive loop keeps the conversation; ``/reset`` clears it, ``/quit`` or EOF ends it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List

from loratune.errors import ConfigError, DataError
from loratune.llm.generation import generate_batch

# the config sections this verb reads: `loratune generate --help` lists only these
SECTIONS = ("task", "model", "quant", "sft", "generate")


def _read_prompts(path: str) -> List[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"generate.prompts_file={path}: not found")
    lines = [l for l in p.read_text(encoding="utf-8-sig").splitlines() if l.strip()]
    if p.suffix == ".jsonl":
        try:
            return [json.loads(l)["prompt"] for l in lines]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(f"{path}: each line must be a JSON object with a 'prompt' field ({exc})") from exc
    return lines


def _chat(model, tokenizer, cfg, template: str) -> None:
    history: List[dict] = []
    print(f"chat with {cfg.model.name}{' + ' + cfg.model.adapter if cfg.model.adapter else ''} "
          f"({template} template); /reset clears, /quit ends", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history = []
            continue
        if template == "chat":
            from loratune.llm.data import _chat_prefix, user_text

            turn = (history or _chat_prefix(cfg.sft)) + [{"role": "user", "content": user_text(line, cfg.sft)}]
            answer = generate_batch(model, tokenizer, [turn], cfg, template, cfg.generate.max_new_tokens)[0]
            history = turn + [{"role": "assistant", "content": answer}]
        else:  # the instruction format has no turns: each line stands alone
            answer = generate_batch(model, tokenizer, [line], cfg, template, cfg.generate.max_new_tokens)[0]
        print(answer, flush=True)


def main(inv) -> int:
    # `prompt=...` is free text (colons, spaces): take it before OmegaConf parses the overrides.
    prompt = None
    keep = []
    for item in inv.overrides:
        key, _, value = item.partition("=")
        if key in ("prompt", "generate.prompt"):
            prompt = value
        else:
            keep.append(item)
    inv.overrides = keep
    cfg = inv.config()
    prompt = prompt if prompt is not None else cfg.generate.prompt
    if cfg.task != "sft":
        raise ConfigError("loratune generate is for causal LMs (task=sft); use loratune transcribe for Whisper")

    from loratune.llm.data import resolve_template
    from loratune.llm.model import load_causal_lm, load_tokenizer

    if cfg.train.threads:
        import torch

        torch.set_num_threads(cfg.train.threads)
    tokenizer = load_tokenizer(cfg)
    template = resolve_template(tokenizer, cfg.sft, cfg.model.name)
    model = load_causal_lm(cfg, adapter=cfg.model.adapter)
    if prompt is not None:
        print(generate_batch(model, tokenizer, [prompt], cfg, template, cfg.generate.max_new_tokens)[0])
    elif cfg.generate.prompts_file:
        prompts = _read_prompts(cfg.generate.prompts_file)
        for i in range(0, len(prompts), cfg.eval.batch_size):
            chunk = prompts[i : i + cfg.eval.batch_size]
            for p, answer in zip(chunk, generate_batch(model, tokenizer, chunk, cfg, template, cfg.generate.max_new_tokens)):
                print(json.dumps({"prompt": p, "answer": answer}, ensure_ascii=False), flush=True)
    else:
        _chat(model, tokenizer, cfg, template)
    return 0
