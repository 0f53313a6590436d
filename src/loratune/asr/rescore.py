"""Re-rank Whisper's n-best list with a causal language model (n-best LM rescoring).

    # configs/*.yaml
    rescore:
      lm: gemma3-270m      # the packaged Gemma 3 270M; any causal LM name loratune resolves
      hypotheses: 5        # beam width and n-best size
      lm_weight: 0.5       # score = log P_whisper(y|audio) + lm_weight * log P_lm(y) + length_bonus * chars(y)
      length_bonus: 0.5

    loratune evaluate configs/whisper-base-hsk-best.yaml model.adapter=DIR       # both backends
    loratune transcribe talk.mp3 model.adapter=DIR rescore.lm=gemma3-270m

Why: two thirds of the HSK adapter's substitutions are homophones (任任贫德 for 人人平等, same
pinyin): the acoustics are right and the character is wrong. whisper-base's decoder knows little
Chinese and 3,475 training sentences cannot teach it more; the right sentence is usually in the
beam (oracle CER of the 5-best 0.014 against 0.047 for the top one, HSK dev), and an LM trained on
trillions of tokens knows which one is Chinese. The length bonus offsets the LM's preference for
short outputs (it would otherwise drop characters). Measured rows: benchmarks/ACCURACY.md (R rows).

Both transcribers ask for ``hypotheses`` candidates per clip (ctranslate2's ``num_hypotheses``,
transformers' ``num_return_sequences``) with their summed log-probabilities and call
``LMRescorer.choose``; everything else (batching, long-form chunks, timestamps) stays theirs.
"""
from __future__ import annotations

import logging
import time
from typing import List, Optional, Sequence, Tuple

from loratune.errors import ConfigError

log = logging.getLogger(__name__)

NBest = List[Tuple[str, float]]  # (text, summed log-probability under Whisper), one list per clip


def characters(text: str) -> int:
    """Characters of ``text`` without whitespace: what ``length_bonus`` is paid for."""
    return len("".join(text.split()))


def dedupe(nbest: NBest) -> NBest:
    """One entry per distinct text (different token paths can spell the same text): the best score kept."""
    best: dict = {}
    for text, score in nbest:
        if text not in best or score > best[text]:
            best[text] = score
    return list(best.items())


class LMRescorer:
    """Scores texts with a causal LM and picks the best of each clip's n-best list."""

    def __init__(self, model, tokenizer, lm_weight: float = 0.5, length_bonus: float = 0.5, hypotheses: int = 5,
                 batch_size: int = 16):
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise ConfigError("rescore.lm: its tokenizer has neither a BOS nor an EOS token to start a text with; "
                              "choose a causal LM that has one (e.g. gemma3-270m)")
        self.model, self.tokenizer, self.start_id = model, tokenizer, start
        self.lm_weight, self.length_bonus, self.hypotheses, self.batch_size = lm_weight, length_bonus, hypotheses, batch_size
        self.device = next(model.parameters()).device

    @classmethod
    def from_config(cls, cfg) -> Optional["LMRescorer"]:
        """The rescorer ``cfg.rescore`` asks for, or None when ``rescore.lm`` is unset."""
        r = cfg.rescore
        if not r.lm:
            return None
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from loratune.errors import ModelError
        from loratune.llm.model import resolve_causal

        name, gguf = resolve_causal(r.lm)
        # bfloat16: faster on CPUs with AVX512-BF16; float32 is exact
        dtype = torch.bfloat16 if r.dtype == "bfloat16" else torch.float32
        begin = time.time()
        try:
            tok = AutoTokenizer.from_pretrained(name, gguf_file=gguf)
            model = AutoModelForCausalLM.from_pretrained(name, gguf_file=gguf, dtype=dtype).eval()
        except Exception as exc:
            raise ModelError(f"rescore.lm={r.lm}: cannot load it as a causal LM ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
        if torch.cuda.is_available():
            model = model.to("cuda")
        log.info("rescoring LM %s loaded in %.1f s", r.lm, time.time() - begin)
        return cls(model, tok, r.lm_weight, r.length_bonus, r.hypotheses, r.batch_size)

    def log_probs(self, texts: Sequence[str]) -> List[float]:
        """Summed log-probability of each text after the start token (no end token: a pilot with one was no better)."""
        import torch

        ids = [[self.start_id] + self.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
        out: List[float] = [0.0] * len(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: less padding
        for s in range(0, len(order), self.batch_size):
            idx = order[s : s + self.batch_size]
            width = max(len(ids[i]) for i in idx)
            # right padding: every text starts at position 0, so no position ids need shifting
            inp = torch.tensor([ids[i] + [self.start_id] * (width - len(ids[i])) for i in idx], device=self.device)
            lengths = torch.tensor([len(ids[i]) for i in idx], device=self.device)
            mask = (torch.arange(width, device=self.device)[None] < lengths[:, None]).long()
            with torch.inference_mode():
                logits = self.model(input_ids=inp, attention_mask=mask).logits[:, :-1].float()
                # log-softmax at the next tokens only: no second vocabulary-wide tensor (Gemma's is 262k wide)
                picked = (logits.gather(-1, inp[:, 1:, None])[..., 0] - logits.logsumexp(-1)) * mask[:, 1:]
            for k, i in enumerate(idx):
                out[i] = float(picked[k].sum())
        return out

    def choose(self, nbests: Sequence[NBest]) -> List[str]:
        """The best text of each clip's n-best list, all clips' candidates scored in one LM pass."""
        nbests = [dedupe(n) for n in nbests]
        texts = sorted({t for n in nbests for t, _ in n if t})
        lm = dict(zip(texts, self.log_probs(texts)))
        chosen = []
        for n in nbests:
            # an empty candidate would get the LM's probability for free: only taken when all are empty;
            # a candidate ending inside a multi-byte character (U+FFFD after decoding: the beam stopped
            # between a character's byte tokens) is cut-off text: only taken when all are
            n = [(t, s) for t, s in n if t and "\ufffd" not in t] or [(t, s) for t, s in n if t] or n[:1]
            if not n:
                chosen.append("")
                continue
            total = [s + self.lm_weight * lm.get(t, 0.0) + self.length_bonus * characters(t) for t, s in n]
            chosen.append(n[max(range(len(n)), key=total.__getitem__)][0])
        return chosen
