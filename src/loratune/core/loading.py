"""Load a base model, optionally with a LoRA adapter, for inference (evaluate/transcribe/merge/serve).

The adapter path follows the tutorials: ``PeftConfig.from_pretrained(dir)`` names the base,
``PeftModel.from_pretrained(base, dir)`` applies it. Before anything heavy is loaded the adapter
directory is checked (``check_adapter``): it must hold ``adapter_config.json`` and
``adapter_model.safetensors`` (pickle ``.bin`` adapters are refused: unpickling runs code), and
after the base is loaded every LoRA matrix is checked against the base's layer names and shapes
(``check_adapter_matches``), so an adapter trained on another base fails with one line instead
of loading silently half-applied.

    from loratune.core.loading import load_asr
    model, processor = load_asr(cfg)          # cfg.model.name (+ cfg.model.adapter)
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from loratune.core.names import resolve_model
from loratune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_adapter(adapter_dir: str | Path) -> Path:
    """Validate an adapter directory's files; returns it as a Path. ModelError if unusable."""
    d = Path(adapter_dir)
    if not d.is_dir():
        raise ModelError(f"model.adapter={d}: not a directory; pass the folder that holds adapter_config.json")
    if not (d / "adapter_config.json").is_file():
        raise ModelError(f"{d}: no adapter_config.json; this is not a PEFT adapter directory (is it a merged model? pass it as model.name)")
    if not (d / ADAPTER_WEIGHTS).is_file():
        pickles = sorted(p.name for p in d.glob("*.bin")) + sorted(p.name for p in d.glob("*.pt"))
        if pickles:
            raise ModelError(
                f"{d}: adapter weights are a pickle file ({pickles[0]}), which can run code when loaded; "
                f"refusing it. Re-save the adapter with save_pretrained(safe_serialization=True) to get {ADAPTER_WEIGHTS}"
            )
        raise ModelError(f"{d}: {ADAPTER_WEIGHTS} is missing; the adapter directory is incomplete")
    try:  # safe_open checks the header against the file size: a truncated file fails here, at once
        from safetensors import safe_open

        with safe_open(str(d / ADAPTER_WEIGHTS), framework="pt") as fh:
            list(fh.keys())
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same one line
        raise ModelError(f"{d / ADAPTER_WEIGHTS}: damaged or truncated ({type(exc).__name__}: {str(exc)[:120]}); "
                         "retrain, or copy the adapter again from where it was trained") from exc
    try:
        json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelError(f"{d / 'adapter_config.json'}: not valid JSON ({exc}); the adapter folder is damaged") from exc
    return d


def adapter_base_name(adapter_dir: str | Path) -> Optional[str]:
    with open(Path(adapter_dir) / "adapter_config.json", encoding="utf-8") as fh:
        return json.load(fh).get("base_model_name_or_path")


def adapter_task_type(adapter_dir: str | Path) -> Optional[str]:
    with open(Path(adapter_dir) / "adapter_config.json", encoding="utf-8") as fh:
        return json.load(fh).get("task_type")


def _lora_shapes(adapter_dir: Path) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """``module path -> (A|B, shape)`` from the adapter file, without loading tensors."""
    from safetensors import safe_open

    shapes = {}
    with safe_open(str(adapter_dir / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            for kind in ("lora_A", "lora_B"):
                marker = f".{kind}."
                if marker in key:
                    module = key.split(marker)[0]
                    # PEFT saves "base_model.model.<path in the base model>"
                    module = module.removeprefix("base_model.model.")
                    shapes[f"{module}|{kind}"] = tuple(f.get_slice(key).get_shape())
    return shapes


def check_adapter_matches(base: torch.nn.Module, adapter_dir: str | Path, base_name: str = "") -> None:
    """ModelError when the adapter's LoRA matrices do not fit ``base`` (missing layers or shapes)."""
    adapter_dir = Path(adapter_dir)
    modules = dict(base.named_modules())
    trained_on = adapter_base_name(adapter_dir) or "?"
    hint = f"the adapter was trained on {trained_on!r}; pass model.name={trained_on}"
    for item, shape in _lora_shapes(adapter_dir).items():
        name, kind = item.split("|")
        module = modules.get(name)
        if module is None:
            raise ModelError(f"{adapter_dir}: adapter layer {name!r} does not exist in base {base_name!r}; {hint}")
        in_f = getattr(module, "in_features", None)
        out_f = getattr(module, "out_features", None)
        if in_f is None or out_f is None:
            continue  # conv/embedding targets: leave the check to PEFT
        expected_dim, got = (in_f, shape[1]) if kind == "lora_A" else (out_f, shape[0])
        if expected_dim != got:
            raise ModelError(
                f"{adapter_dir}: adapter layer {name} is {got} wide but base {base_name!r} has {expected_dim}; {hint}"
            )


def check_language(language: Optional[str], model=None) -> Optional[str]:
    """Return the Whisper language code for ``language`` (code or English name); None = detect.

    ConfigError for anything Whisper does not know, or that this checkpoint has no token for.
    """
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    if language is None or str(language).lower() in ("", "auto", "none", "null", "detect"):
        return None
    lang = str(language).lower().strip().strip("<|>")
    code = lang if lang in LANGUAGES else TO_LANGUAGE_CODE.get(lang)
    if code is None:
        raise ConfigError(
            f"whisper.language={language!r} is not a language Whisper knows; use a code such as zh, en, ja, de "
            f"(or null to let the model detect it)"
        )
    lang_to_id = getattr(getattr(model, "generation_config", None), "lang_to_id", None)
    if lang_to_id and f"<|{code}|>" not in lang_to_id:
        raise ConfigError(f"whisper.language={code!r}: this checkpoint has no token for it (it knows {len(lang_to_id)} languages)")
    return code


def _dtype_for(device: torch.device, name: Optional[str] = None) -> torch.dtype:
    from loratune.core.adapters import DTYPES

    if name:
        return DTYPES[name]
    return torch.float16 if device.type == "cuda" else torch.float32


def load_base(name: str, kind: str = "asr", dtype: Optional[torch.dtype] = None, quant=None, gguf_file: Optional[str] = None, device: Optional[torch.device] = None, attn_implementation: Optional[str] = None):
    """Load a base model by Hub id, local directory or packaged alias. ``kind``: ``asr`` or ``sft``.

    ``quant`` is a :class:`QuantSection`; with ``bits`` 4/8 the base loads through bitsandbytes.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSpeechSeq2Seq

    from loratune.core.adapters import bnb_config, keep_4bit_layout

    device = device or default_device()
    path = resolve_model(name)
    kwargs = dict(dtype=dtype or _dtype_for(device))
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    qcfg = bnb_config(quant) if quant is not None else None
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
        if device.type == "cuda":
            kwargs["device_map"] = {"": device.index or 0}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    cls = AutoModelForSpeechSeq2Seq if kind == "asr" else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name={name!r}: cannot load it ({str(exc).splitlines()[0]}); pass a local model directory or a packaged alias such as whisper-base") from exc
    if qcfg is None:
        model.to(device)
    else:
        keep_4bit_layout(model)  # same numbers on every CPU as in training (see keep_4bit_layout)
    model.eval()
    return model


def load_processor(name: str, adapter_dir: Optional[str | Path] = None, kind: str = "asr"):
    """Processor (Whisper) or tokenizer (causal LM): from the adapter dir when saved there, else the base."""
    from transformers import AutoProcessor, AutoTokenizer

    loader = AutoProcessor if kind == "asr" else AutoTokenizer
    for source in ([str(adapter_dir)] if adapter_dir else []) + [resolve_model(name)]:
        try:
            return loader.from_pretrained(source)
        except Exception:  # noqa: BLE001 - not there / another kind of file: try the next source
            continue
    raise ModelError(f"model.name={name!r}: no processor/tokenizer found beside the model; save one with the model")


def apply_adapter(base: torch.nn.Module, adapter_dir: str | Path, base_name: str = ""):
    """Check and apply a LoRA adapter (inference mode) -> ``PeftModel``."""
    from peft import PeftModel

    adapter_dir = check_adapter(adapter_dir)
    check_adapter_matches(base, adapter_dir, base_name)
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    model.eval()
    return model


def load_asr(cfg, adapter: Optional[str] = None, quantize: bool = True, dtype: Optional[torch.dtype] = None):
    """(model, processor) for Whisper inference from ``cfg.model`` (+ the adapter, if any).

    The base is ``cfg.model.name``; the adapter's own ``base_model_name_or_path`` is only used in
    the mismatch message (paths differ between machines, shapes and layer names do not).
    ``quantize`` honours ``cfg.quant`` (the numerics the adapter was trained with).
    """
    adapter = adapter if adapter is not None else cfg.model.adapter
    if adapter:
        check_adapter(adapter)  # fail on a bad adapter before the (slow) base load
    if cfg.task != "asr":
        raise ConfigError(f"task={cfg.task}: this command needs a Whisper model (task=asr)")
    model = load_base(cfg.model.name, "asr", dtype=dtype, quant=cfg.quant if quantize else None, attn_implementation=cfg.model.attn_implementation)
    processor = load_processor(cfg.model.name, adapter, "asr")
    check_language(cfg.whisper.language, model)
    if adapter:
        model = apply_adapter(model, adapter, cfg.model.name)
    return model, processor
