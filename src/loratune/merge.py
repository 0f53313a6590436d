"""``loratune merge [RECIPE.yaml] model.adapter=DIR [model.name=BASE] [OUT_DIR] [merge.dtype=float16]``.

Folds a LoRA adapter into its base and saves a standalone model (safetensors + config +
generation config + processor/tokenizer) that plain transformers loads, e.g.
``pipeline("automatic-speech-recognition", model=OUT_DIR)`` or ``AutoModelForCausalLM``. Examples::

    loratune merge configs/whisper-base-hsk-qlora.yaml model.adapter=outputs/whisper-base-hsk-qlora out/merged
    loratune merge task=sft model.name=gemma3-270m model.adapter=outputs/gemma-sft merge.dtype=bfloat16

Adapters trained on a 4-bit or 8-bit base are merged into the **de-quantised** base: the base is
reloaded from its original weights in ``merge.dtype`` (float32 default; float16/bfloat16 halve the
size), ignoring ``quant.*``. Merging into packed bitsandbytes weights would either fail or bake
rounding error into a model that is then re-quantised; ``merge_and_unload`` on full-precision
weights is exact. The model kind comes from the adapter's PEFT ``task_type`` (SEQ_2_SEQ_LM ->
Whisper, CAUSAL_LM -> causal LM), falling back to ``task``. The output is written to a temporary
folder and renamed into place, so an interrupted merge leaves nothing half-written.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from loratune.core.atomic import atomic_dir, write_json
from loratune.core.names import public_id, resolve_model
from loratune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


# the config sections this verb reads: `loratune merge --help` lists only these
SECTIONS = ("task", "model", "quant", "merge")


def _kind(cfg, adapter_dir: str) -> str:
    from loratune.core.loading import adapter_task_type

    task_type = (adapter_task_type(adapter_dir) or "").upper()
    if task_type == "CAUSAL_LM":
        return "sft"
    if task_type == "SEQ_2_SEQ_LM":
        return "asr"
    try:  # loratune trains Whisper adapters without a task_type: ask the base's config
        from transformers import AutoConfig

        if AutoConfig.from_pretrained(resolve_model(cfg.model.name)).model_type == "whisper":
            return "asr"
    except Exception:  # noqa: BLE001 - unreadable config: the loader reports it properly
        pass
    return cfg.task


def _save_tokenizer_side(cfg, adapter_dir: str, kind: str, out: Path) -> None:
    from loratune.core.loading import load_processor

    load_processor(cfg.model.name, adapter_dir, kind).save_pretrained(str(out))


def merge(cfg, output_dir: Optional[str] = None) -> Path:
    """Merge ``cfg.model.adapter`` into ``cfg.model.name``; returns the output directory."""
    from loratune.core.adapters import DTYPES
    from loratune.core.loading import adapter_base_name, apply_adapter, check_adapter, load_base

    adapter = cfg.model.adapter
    if not adapter:
        raise ConfigError("loratune merge needs model.adapter=DIR (the trained adapter folder)")
    check_adapter(adapter)
    out = Path(output_dir or cfg.merge.output_dir or f"{str(adapter).rstrip('/')}-merged")
    if out.exists() and any(out.iterdir()) and not (out / "loratune_merge.json").is_file():
        raise ModelError(f"{out}: exists and is not an earlier merge output; choose another output dir or empty it")
    kind = _kind(cfg, adapter)
    dtype = DTYPES[cfg.merge.dtype]
    start = time.perf_counter()
    if cfg.quant.bits:
        log.info("adapter trained on a %d-bit base: merging into the de-quantised %s base instead", cfg.quant.bits, cfg.merge.dtype)
    base = load_base(cfg.model.name, kind, dtype=dtype, quant=None, gguf_file=cfg.model.gguf_file, device=torch.device("cpu"))
    model = apply_adapter(base, adapter, cfg.model.name)
    merged = model.merge_and_unload()
    # a config copied from a quantised training base must not tell loaders to quantise again
    for holder in (merged.config,):
        if getattr(holder, "quantization_config", None) is not None:
            del holder.quantization_config
    info = {
        "base": public_id(cfg.model.name),
        "adapter": str(adapter),
        "adapter_trained_on": adapter_base_name(adapter),
        "kind": kind,
        "dtype": cfg.merge.dtype,
        "trained_quant_bits": cfg.quant.bits,
    }

    def build(tmp: Path) -> None:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        _save_tokenizer_side(cfg, adapter, kind, tmp)
        info["seconds"] = round(time.perf_counter() - start, 2)
        write_json(tmp / "loratune_merge.json", info)

    atomic_dir(out, build, overwrite=True)  # only an earlier merge output gets this far (checked above)
    log.info("merged %s into %s -> %s (%s, %.1f s)", adapter, cfg.model.name, out, cfg.merge.dtype, info["seconds"])
    return out


def main(inv) -> int:
    cfg = inv.config()
    if len(inv.paths) > 1:
        raise ConfigError(f"loratune merge takes one output directory, got {len(inv.paths)}: {' '.join(inv.paths)}")
    out = merge(cfg, inv.paths[0] if inv.paths else None)
    print(f"merged model written to {out}")
    return 0
