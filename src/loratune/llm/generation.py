"""Batched text generation with a causal LM (+ adapter): the one code path behind ``loratune generate``
(one prompt, a prompts file, chat) and ``loratune evaluate`` of SFT adapters.

    from loratune.llm.generation import generate_batch
    answers = generate_batch(model, tokenizer, ["translate: 你好"], cfg, template="chat", max_new_tokens=64)
"""
from __future__ import annotations

from typing import Any, List

from loratune.config import GenerateSection

STOP_MARKER = "###"
"""Where the instruction format's next section (``### Instruction`` / ``### Response``) starts: an answer ends there."""


def clean_answer(text: str, template: str) -> str:
    if template == "instruction" and STOP_MARKER in text:
        text = text[: text.find(STOP_MARKER)]
    return text.strip()


def generate_batch(model, tokenizer, prompts: List[Any], cfg, template: str, max_new_tokens: int) -> List[str]:
    """Greedy/sampled answers for a batch of prompts (strings or chat histories), left-padded."""
    import torch

    from loratune.llm.data import encode_prompt, render_prompt
    from loratune.llm.model import stop_token_ids

    gen: GenerateSection = cfg.generate
    ids = [encode_prompt(tokenizer, render_prompt(tokenizer, cfg.sft, template, p), template) for p in prompts]
    width = max(map(len, ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    device = next(model.parameters()).device
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=gen.do_sample, num_beams=gen.num_beams,
                  repetition_penalty=gen.repetition_penalty, eos_token_id=stop_token_ids(tokenizer, model), pad_token_id=pad)
    if template == "instruction":  # stop where the format's next section would begin (clean_answer cuts it)
        kwargs.update(stop_strings=[STOP_MARKER], tokenizer=tokenizer)
    if gen.do_sample:
        torch.manual_seed(gen.seed)
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    else:  # keep a checkpoint's sampling defaults from turning greedy decoding noisy in the logs
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), **kwargs)
    return [clean_answer(tokenizer.decode(row[width:], skip_special_tokens=True), template) for row in out]
