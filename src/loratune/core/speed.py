"""Speed levers that are not a single transformers/PEFT switch (see README.md (Performance)).

    from loratune.core.speed import apply_training_speed, check_device_support
    model = attach_lora(model, cfg, task_type=...)
    check_device_support(cfg)              # before any long work: bf16 / flex attention need the right device
    apply_training_speed(model, cfg)       # train.dequantize_base / frozen_dtype / checkpoint_fraction /
                                           # compile_layers / cuda_graphs, model.sdpa_backend

Architecture-specific parts come in through :class:`SpeedHooks`; Whisper's (encoder input dtype,
CUDA-graph layers, the precomputed decoder mask, generation speed) live in ``loratune.asr.speed``.

Each lever is measured in ``benchmarks/`` and checked against the slow path by
``tests/test_speed_paths.py``.
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch
from torch import nn

from loratune.core.adapters import peft_base

log = logging.getLogger(__name__)

_PACKED = ("Params4bit", "Int8Params")  # bitsandbytes storage: never cast


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every frozen floating-point parameter and buffer (not bitsandbytes-packed) to ``dtype``.

    ``prepare_model_for_kbit_training`` upcasts all non-quantised weights (norms, convolutions,
    embeddings, biases) to fp32 so that a run without autocast is stable. With bf16 autocast that
    copy only costs bandwidth: activations stay fp32 between layers and attention runs in fp32.
    Trainable (LoRA) weights stay fp32, so the optimiser still updates fp32 master weights.
    Returns the number of tensors cast.
    """
    n = 0
    for p in model.parameters():
        if p.requires_grad or not p.is_floating_point() or type(p).__name__ in _PACKED or p.dtype == dtype:
            continue
        p.data = p.data.to(dtype)
        n += 1
    for module in model.modules():
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_floating_point() and buf.dtype != dtype and "inv_freq" not in name:
                module._buffers[name] = buf.to(dtype)
                n += 1
    return n


def checkpointing_layers(model: nn.Module):
    """The layers gradient checkpointing acts on (transformers' ``GradientCheckpointingLayer``)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def set_checkpointed_layers(model: nn.Module, fraction: Optional[float]) -> int:
    """Keep activation checkpointing on only the first ``fraction`` of the layers (after enabling it).

    Full checkpointing recomputes every layer's forward in the backward pass (+~33% compute); when
    memory allows, storing some layers' activations buys part of that back. ``None`` or 1.0 leaves
    every layer checkpointed. Returns how many layers stay checkpointed.
    """
    layers = checkpointing_layers(model)
    if fraction is None or fraction >= 1.0:
        return sum(bool(getattr(l, "gradient_checkpointing", False)) for l in layers)
    keep = int(round(len(layers) * max(fraction, 0.0)))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = bool(getattr(layer, "gradient_checkpointing", False)) and i < keep
    return keep


def dequantize_frozen(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every bitsandbytes 4-bit / 8-bit linear layer by a plain ``nn.Linear`` holding its
    dequantised weights in ``dtype``; returns how many were replaced.

    4-bit: bitsandbytes dequantises NF4 to the compute dtype before every matmul, forward and
    backward, so a bf16 copy of the *same* NF4 values computes the same function (the adapter
    still learns against the quantised base) with plain cuBLAS GEMMs and no custom autograd. It
    costs 2 bytes instead of ~0.5 per frozen weight: worth it when the GPU has the room (Whisper
    turbo: +1.2 GB). 8-bit: the copy holds the int8 weights exactly, but the matmul no longer
    quantises activations (LLM.int8 does), so it is weight-only int8, slightly *more* precise.
    Call after ``attach_lora`` (PEFT's LoRA layers keep wrapping the new ``base_layer``).
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, int8_vectorwise_dequant

    from loratune.core.adapters import keep_4bit_layout

    keep_4bit_layout(model)  # a weight repacked for bitsandbytes' CPU kernel would dequantise scrambled
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                w = dequantize_4bit(child.weight.data, child.weight.quant_state)
            elif isinstance(child, bnb.nn.Linear8bitLt):
                # int8 rows + per-row scale; after the first forward the scale lives in .state
                scb = getattr(child.weight, "SCB", None)
                scb = scb if scb is not None else getattr(child.state, "SCB", None)
                if child.weight.dtype != torch.int8:
                    w = child.weight.data  # never quantised (kept in float by bitsandbytes)
                elif scb is None:
                    raise RuntimeError(f"{name}: int8 weights without their scale (SCB); cannot dequantise")
                else:
                    w = int8_vectorwise_dequant(child.weight.data, scb)
            else:
                continue
            lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device=w.device, dtype=dtype)
            lin.weight = nn.Parameter(w.to(dtype).reshape(child.out_features, child.in_features), requires_grad=False)
            if child.bias is not None:
                lin.bias = nn.Parameter(child.bias.detach().to(dtype), requires_grad=False)
            setattr(parent, name, lin)
            n += 1
    return n


def compile_layers(model: nn.Module, graph_layers: Sequence[nn.Module] = ()) -> int:
    """Regional ``torch.compile``: each transformer layer gets the compiled forward of its class
    (one graph, reused by every layer of that class), so compilation takes seconds, not minutes,
    and element-wise work (norms, dropout, GELU, residuals) fuses into few kernels.

    ``graph_layers`` (a subset, inputs of one fixed shape): their training calls also replay the
    compiled kernels as CUDA graphs (``train.cuda_graphs``); see :func:`_route_train_graphs`."""
    layers = checkpointing_layers(model)
    graph_ids = {id(m) for m in graph_layers}
    for layer in layers:
        if id(layer) in graph_ids and not getattr(layer, "gradient_checkpointing", False):
            _route_train_graphs(layer)
        else:
            layer.compile()
    if graph_ids:
        # a new forward in training = a new step: outputs of the last step's graph replays may be
        # overwritten from here on (they were consumed by its backward)
        model.register_forward_pre_hook(_new_graph_step)
    return len(layers)


def _route_train_graphs(layer: nn.Module) -> None:
    """Two compiled versions of ``layer``'s call: CUDA-graph replays for training calls (grad on,
    ``layer.training``), the plain compiled kernels for everything else (evaluation, generation
    with its growing KV cache, whose many shapes would each record a graph). Both compile the same
    bound ``_call_impl`` that ``nn.Module.compile`` does, which is the attribute it sets."""
    graphs = torch.compile(layer._call_impl, mode="reduce-overhead")
    plain = torch.compile(layer._call_impl)

    def call(*args, **kwargs):
        fn = graphs if layer.training and torch.is_grad_enabled() else plain
        return fn(*args, **kwargs)

    layer._compiled_call_impl = call


def _new_graph_step(module: nn.Module, args) -> None:
    if module.training and torch.is_grad_enabled():
        torch.compiler.cudagraph_mark_step_begin()


def set_sdpa_backend(name: Optional[str]) -> bool:
    """Make PyTorch's scaled-dot-product attention use one fused kernel family on a CUDA GPU.

    The switch is process-wide (``torch.backends.cuda``), so the Trainer's own forward calls see it
    without a context manager. The other fused kernels are turned off; PyTorch's math kernel stays
    as the fallback for a call the chosen kernel cannot run. Returns whether anything was set.
    """
    if not name or not torch.cuda.is_available():
        return False
    cuda = torch.backends.cuda
    cuda.enable_cudnn_sdp(name == "cudnn")
    cuda.enable_flash_sdp(name == "flash")
    cuda.enable_mem_efficient_sdp(name == "efficient")
    return True


def cpu_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU has bfloat16 instructions (x86 ``avx512_bf16`` or ``amx_bf16``); elsewhere oneDNN
    emulates bf16, slower than float32. (The HSK default trained ~15 % faster with it and scored worse:
    benchmarks/ACCURACY.md row B1.)"""
    try:
        with open(cpuinfo) as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no way to tell, stay float32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_autocast_bf16(t) -> bool:
    """Whether a CPU run trains under bf16 autocast (``train.cpu_bf16`` and a CPU that has it)."""
    return bool(getattr(t, "cpu_bf16", False)) and not torch.cuda.is_available() and cpu_native_bf16()


def check_device_support(cfg) -> None:
    """Refuse, in one line and before data loading or training, settings this machine cannot run."""
    from loratune.errors import ConfigError

    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() > 1 and "WORLD_SIZE" not in os.environ:
        n = torch.cuda.device_count()
        raise ConfigError(f"{n} GPUs are visible to one process: the Trainer would fall back to DataParallel (slower, and "
                          f"not what the recipes were measured with); run `loratune train ... --gpus {n}` for DDP, or "
                          "set CUDA_VISIBLE_DEVICES=0 for one GPU")
    wants_bf16 = cfg.train.bf16 or (cfg.quant.bits and cfg.quant.compute_dtype == "bfloat16")
    if wants_bf16 and cuda and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            f"{torch.cuda.get_device_name(0)} has no bfloat16; set train.bf16=false train.fp16=true "
            "quant.compute_dtype=float16 (and train.frozen_dtype=float16 if set)"
        )
    if getattr(cfg.train, "cpu_bf16", False) and not cuda and not cpu_native_bf16():
        log.info("train.cpu_bf16: this CPU has no native bfloat16 (avx512_bf16 / amx_bf16): training in float32")
    if cfg.model.attn_implementation == "flex_attention" and not cuda:
        raise ConfigError("model.attn_implementation=flex_attention trains only on a CUDA GPU; use sdpa here")
    if cfg.train.liger_kernel:
        import importlib.util

        if not cuda or importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError("train.liger_kernel=true needs a CUDA GPU and `pip install 'loratune[gpu-speed]'` "
                              "(liger-kernel); set it false here")


class SpeedHooks:
    """What an architecture adds to :func:`apply_training_speed` (the Whisper wing's are in
    ``asr.speed``); the defaults do nothing."""

    def after_half_cast(self, model: nn.Module) -> bool:
        """After frozen weights went to bf16/fp16: fix inputs that would meet them outside autocast."""
        return False

    def graph_layers(self, model: nn.Module, cfg) -> list:
        """Layers whose training calls may replay as CUDA graphs (inputs of one fixed shape)."""
        log.info("train.cuda_graphs skipped: no layers of this architecture have one fixed input shape")
        return []

    def after_graphs(self, model: nn.Module) -> None:
        """Remove per-step GPU syncs around the graph layers."""


def apply_training_speed(model: nn.Module, cfg, hooks: Optional[SpeedHooks] = None) -> dict:
    """Apply the ``train.*`` speed options to a model that ``attach_lora`` has already wrapped.

    Order matters: dequantise first (it replaces modules), then cast what stays frozen, then trim
    checkpointing, then compile (compilation sees the final modules). Returns what was done, for
    the run summary. The GPU-only levers (``compile_layers``, ``cuda_graphs``, ``model.sdpa_backend``)
    are skipped with a log line on a machine without CUDA, so a GPU recipe still runs (slowly) on a
    CPU.
    See README.md (Performance) for the measured gains.
    """
    from loratune.core.adapters import DTYPES  # train.frozen_dtype's values are checked when the config loads

    hooks = hooks or SpeedHooks()
    t = cfg.train
    cuda = torch.cuda.is_available()
    done = {}
    frozen = t.frozen_dtype
    if frozen in ("bfloat16", "float16") and not (cuda and (t.bf16 or t.fp16)):
        # half-precision frozen weights need autocast; the Trainer runs none on the CPU (or with
        # bf16/fp16 off), and fp32 inputs would meet bf16 weights: keep fp32 there
        log.info("train.frozen_dtype=%s skipped: no autocast on this device; frozen weights stay float32", frozen)
        frozen = "float32"
    if getattr(t, "dequantize_base", False) and cfg.quant.bits:
        done["dequantized_layers"] = dequantize_frozen(model, DTYPES[frozen or "bfloat16"])
    if frozen:
        done["cast_frozen_tensors"] = cast_frozen(model, DTYPES[frozen])
        if frozen in ("bfloat16", "float16") and hooks.after_half_cast(model):
            done["encoder_input_dtype"] = frozen
    if cpu_autocast_bf16(t):  # the Trainer's autocast does it; recorded in the run summary
        done["cpu_bf16_autocast"] = True
    fraction = getattr(t, "checkpoint_fraction", 1.0)
    if t.gradient_checkpointing and fraction < 1.0:
        done["checkpointed_layers"] = set_checkpointed_layers(peft_base(model), fraction)
    if getattr(t, "compile_layers", False):
        if cuda:
            graph_layers = hooks.graph_layers(model, cfg) if getattr(t, "cuda_graphs", False) else []
            done["compiled_layers"] = compile_layers(model, graph_layers)
            if graph_layers:
                done["cuda_graph_layers"] = len(graph_layers)
                hooks.after_graphs(model)
        else:
            log.info("train.compile_layers skipped: it is a GPU lever (no CUDA here)")
    elif getattr(t, "cuda_graphs", False):
        log.info("train.cuda_graphs skipped: it replays compiled layers; set train.compile_layers=true too")
    if set_sdpa_backend(getattr(cfg.model, "sdpa_backend", None)):
        done["sdpa_backend"] = cfg.model.sdpa_backend
    if done:
        log.info("speed settings: %s", done)
    return done
