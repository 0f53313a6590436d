"""Quantisation and LoRA glue shared by Whisper and causal LMs.

``bnb_config(cfg.quant)`` builds transformers' ``BitsAndBytesConfig`` (or None);
``attach_lora(model, cfg)`` runs ``prepare_model_for_kbit_training`` on quantised bases, checks
that every target module exists (listing the real linear layers when not), wraps the model
with PEFT and reports trainable parameters and memory footprint.
"""
from __future__ import annotations

import logging
from typing import List, Optional

import torch

from loratune.config import LoraSection, QuantSection, RunConfig
from loratune.errors import ConfigError

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def bnb_config(quant: QuantSection):
    """BitsAndBytesConfig for ``quant.bits`` 4 or 8, None for 0."""
    if quant.bits == 0:
        return None
    from transformers import BitsAndBytesConfig

    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    kwargs = dict(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=DTYPES[quant.compute_dtype],
    )
    if quant.quant_storage:
        kwargs["bnb_4bit_quant_storage"] = DTYPES[quant.quant_storage]
    return BitsAndBytesConfig(**kwargs)


def keep_4bit_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns the
    number of 4-bit layers it now leaves alone.

    Why: on CPUs with AVX512-BF16, bitsandbytes >= 0.49 repacks a ``Linear4bit`` weight *in place*
    the first time the layer runs in eval mode without grad (``packing_format_for_cpu``), rounds
    its absmax scales to bf16 and computes in bf16 from then on, whatever compute dtype was asked
    for. It never packs back when the model returns to training, so after one evaluation the next
    training step takes the inference kernel (``result += bias`` then fails on layers with a bias,
    and no gradient flows through the base), and ``dequantize_4bit`` of a packed weight returns
    scrambled values. Call right after ``from_pretrained``, before any forward pass; a layer that
    was already packed is restored first (its absmax keeps the bf16 rounding the packing did).
    """
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    n = 0
    for module in model.modules():
        if type(module).__name__ != "Linear4bit" or not type(module).__module__.startswith("bitsandbytes"):
            continue
        weight = module.weight
        if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            module.quant_state = weight.quant_state
        module.support_avx512bf16_for_cpu = False  # read by Linear4bit.forward before it repacks
        n += 1
    return n


def linear_module_names(model: torch.nn.Module) -> List[str]:
    """Distinct last-component names of every linear layer (plain or bitsandbytes)."""
    names = set()
    for full_name, module in model.named_modules():
        cls = type(module).__name__
        if isinstance(module, torch.nn.Linear) or cls in ("Linear4bit", "Linear8bitLt"):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model: torch.nn.Module, targets: List[str]) -> None:
    """Stop before training when a LoRA target matches no module of this architecture."""
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in present and t != "all-linear"]
    if missing:
        raise ConfigError(
            f"lora.target_modules {missing} match nothing in {type(model).__name__}; "
            f"its linear layers are: {', '.join(linear_module_names(model))}"
        )
    linear = set(linear_module_names(model))
    not_linear = [t for t in targets if t != "all-linear" and t not in linear]
    if not_linear:  # a norm, an embedding or a whole block: LoRA adapts linear layers only
        raise ConfigError(
            f"lora.target_modules {not_linear} are not linear layers in {type(model).__name__}; "
            f"LoRA adapts these: {', '.join(sorted(linear))}"
        )


def peft_base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def footprint_gb(model: torch.nn.Module) -> float:
    return model.get_memory_footprint() / 1e9 if hasattr(model, "get_memory_footprint") else float("nan")


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def attach_lora(model: torch.nn.Module, cfg: RunConfig, task_type: str, gradient_checkpointing: Optional[bool] = None):
    """Prepare a (possibly quantised) base for training and wrap it with a PEFT LoRA adapter."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    lora: LoraSection = cfg.lora
    check_target_modules(model, lora.target_modules)
    before = footprint_gb(model)
    use_gc = cfg.train.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
    # FSDP + QLoRA: FSDP flattens each wrapped unit (a decoder layer) into one tensor of one dtype, so
    # the norms must stay in the bf16 the 4-bit weights are stored in (quant.quant_storage);
    # prepare_model_for_kbit_training would upcast them to fp32 ("Must flatten tensors with uniform
    # dtype", measured on an H200 with the 70B recipe's architecture, benchmarks/RESULTS.md run 35)
    fsdp_qlora = bool(cfg.quant.bits == 4 and cfg.quant.quant_storage and fsdp_launched())
    if cfg.quant.bits and not fsdp_qlora:
        # Casts norms/embeddings to fp32 and enables input grads so checkpointing works on a frozen base.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=use_gc,
            gradient_checkpointing_kwargs={"use_reentrant": False} if use_gc else None,
        )
    elif use_gc or fsdp_qlora:
        if use_gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    targets = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    peft_cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        task_type=task_type,
        use_dora=lora.use_dora,
        use_rslora=lora.use_rslora,
        init_lora_weights=True if lora.init == "default" else lora.init,
    )
    model = get_peft_model(model, peft_cfg)
    trainable, total = trainable_parameters(model)
    after = footprint_gb(model)
    log.info(
        "trainable params: %s / %s (%.2f%%); memory footprint %.3f GB -> %.3f GB with adapters",
        f"{trainable:,}", f"{total:,}", 100.0 * trainable / max(total, 1), before, after,
    )
    model.loratune_report = {  # read by the training summary
        "trainable_params": trainable,
        "total_params": total,
        "footprint_gb_base": round(before, 4),
        "footprint_gb_with_adapters": round(after, 4),
    }
    return model


def fsdp_launched() -> bool:
    """True in a process ``accelerate launch`` started with an FSDP config (it sets ACCELERATE_USE_FSDP)."""
    import os

    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def device_map_for_rank():
    """Where to place a (quantised) base: one whole copy per process/device.

    bitsandbytes weights cannot be moved after loading, so under DDP (torchrun / accelerate
    launch) each rank must load straight onto its own GPU, ``{"": LOCAL_RANK}``; on a CPU-only
    machine the model stays on the CPU (None).
    """
    import os

    if not torch.cuda.is_available():
        return None
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}
