"""Fast paths keep the slow path's results: losses (training) and transcripts (inference), tiny Whisper.

Run: python -m pytest -q tests/test_speed_paths.py

Tolerances: bf16 autocast with the frozen base cast to bf16 follows the fp32 loss curve within 3%
(bf16 has 8 mantissa bits; observed < 1%); partial / full activation checkpointing and larger
batches change nothing beyond float rounding (1e-5); a static KV cache decodes the same tokens.
"""
from __future__ import annotations

import numpy as np
import torch

from loratune.core.speed import cast_frozen, checkpointing_layers, set_checkpointed_layers

torch.set_num_threads(1)
LABELS = torch.tensor([[50258, 50260, 50359, 50363, 1000, 2000, 3000, 50257]] * 4)


def lora_model(tiny, checkpointing=False):
    """Tiny Whisper + LoRA, encoder trimmed so that 4-s inputs keep the CPU test fast (the levers
    under test do not depend on the input length)."""
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    from loratune.asr.trim import enable_encoder_trimming

    torch.manual_seed(0)
    model = enable_encoder_trimming(WhisperForConditionalGeneration.from_pretrained(tiny))
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    for n, p in model.named_parameters():  # non-zero B so the adapter changes the output from step 0
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    return model


def features(seed=0, frames=400):
    g = torch.Generator().manual_seed(seed)
    return 0.5 * torch.randn(4, 80, frames, generator=g)


def train_curve(model, steps=6, amp=None, lr=3e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    feats = features()
    model.train()
    losses = []
    for _ in range(steps):
        ctx = torch.autocast("cpu", dtype=amp) if amp else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = model(input_features=feats, labels=LABELS).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return np.array(losses)


def test_bf16_autocast_with_frozen_bf16_follows_fp32_curve(tiny):
    slow = train_curve(lora_model(tiny))
    model = lora_model(tiny)
    n = cast_frozen(model, torch.bfloat16)
    assert n > 0
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # fp32 master LoRA weights
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    fast = train_curve(model, amp=torch.bfloat16)
    assert slow[-1] < slow[0] - 0.3  # the adapter really learns in these steps
    np.testing.assert_allclose(fast, slow, rtol=0.03)


def test_checkpointing_all_half_none_same_loss_and_grads(tiny):
    results = []
    for fraction in (None, 1.0, 0.5):
        model = lora_model(tiny, checkpointing=fraction is not None)
        if fraction is not None:
            kept = set_checkpointed_layers(model.get_base_model(), fraction)
            assert kept == round(len(checkpointing_layers(model)) * fraction)
        model.train()
        loss = model(input_features=features(), labels=LABELS).loss
        loss.backward()
        grads = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad])
        results.append((loss.detach(), grads))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads, results[0][1], rtol=1e-4, atol=1e-6)


def test_partial_checkpointing_really_skips_layers(tiny):
    model = lora_model(tiny, checkpointing=True)
    layers = checkpointing_layers(model)
    set_checkpointed_layers(model.get_base_model(), 0.5)
    flags = [bool(l.gradient_checkpointing) for l in layers]
    assert flags[: len(flags) // 2] == [True] * (len(flags) // 2) and not any(flags[len(flags) // 2 :])


def generate(model, feats, **kw):
    with torch.no_grad():
        return model.generate(input_features=feats, language="zh", task="transcribe", max_new_tokens=12, **kw)


def test_generate_batching_and_static_cache_keep_transcripts(tiny):
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tiny).eval()
    feats = features(seed=3, frames=3000)
    batched = generate(model, feats)
    one_by_one = [generate(model, feats[i : i + 1]) for i in range(4)]
    for i, seq in enumerate(one_by_one):
        n = seq.shape[-1]
        assert torch.equal(seq[0], batched[i, :n]) and (batched[i, n:] == model.generation_config.pad_token_id).all()
    static = generate(model, feats, cache_implementation="static")
    assert torch.equal(static, batched)


def test_bf16_generate_keeps_most_tokens(tiny):
    """bf16 inference vs fp32 on a random tiny model: the greedy path agrees on the first tokens."""
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(tiny).eval()
    feats = features(seed=4, frames=3000)
    ref = generate(model, feats)
    fast = generate(model.to(torch.bfloat16), feats.to(torch.bfloat16))
    n = min(ref.shape[-1], fast.shape[-1])
    agree = (ref[:, :n] == fast[:, :n]).float().mean().item()
    assert agree >= 0.8, agree


def test_dequantized_4bit_base_is_the_same_function(tiny):
    """train.dequantize_base on a 4-bit base: same logits (bitsandbytes dequantises the same NF4 values)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, WhisperForConditionalGeneration

    from loratune.asr.speed import apply_training_speed
    from loratune.config import load_config
    from loratune.core.adapters import keep_4bit_layout

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    model = WhisperForConditionalGeneration.from_pretrained(tiny, quantization_config=q, device_map="cpu").eval()
    keep_4bit_layout(model)  # as loratune's loaders do: fp32 compute on every CPU (AVX512-BF16 ones too)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    feats = features(seed=5, frames=3000)
    with torch.no_grad():
        before = model(input_features=feats, labels=LABELS).logits
    cfg = load_config(None, ["quant.bits=4", "train.dequantize_base=true", "train.frozen_dtype=float32"])
    done = apply_training_speed(model, cfg)
    assert done["dequantized_layers"] == 2 * 6 + 2 * 10  # 2 encoder layers x 6 linears, 2 decoder layers x 10
    assert not any(type(m).__name__ == "Linear4bit" for m in model.modules() if type(m).__module__.startswith("bitsandbytes"))
    with torch.no_grad():
        after = model(input_features=feats, labels=LABELS).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    model.train()
    model(input_features=feats, labels=LABELS).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_dequantize_after_cpu_repacking_gives_the_quantised_weights(tiny):
    """bitsandbytes >= 0.49 repacks a 4-bit weight in place for its AVX512-BF16 CPU kernel at the
    first no-grad eval forward; dequantising that layout gave scrambled weights (logits off by ~1,
    seen on CI's CPU). The repacking is done by hand here so the test runs on every CPU."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit
    from transformers import BitsAndBytesConfig, WhisperForConditionalGeneration

    from loratune.core.speed import dequantize_frozen

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                           bnb_4bit_compute_dtype=torch.float32)
    model = WhisperForConditionalGeneration.from_pretrained(tiny, quantization_config=q, device_map="cpu").eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    name, layer = next((n, m) for n, m in layers.items() if m.out_features % 32 == 0)
    # absmax already bf16-representable, so the packing's bf16 rounding loses nothing and the
    # restored weights must be exact
    layer.weight.quant_state.absmax = layer.weight.quant_state.absmax.to(torch.bfloat16).float()
    expected = dequantize_4bit(layer.weight.data, layer.weight.quant_state).reshape(layer.out_features, -1)
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert dequantize_frozen(model, torch.float32) == len(layers)
    got = model.get_submodule(name).weight
    assert type(model.get_submodule(name)) is torch.nn.Linear
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_loaders_keep_the_training_layout_of_4bit_weights(tiny):
    """The loaders switch the repacking off, and undo it where it already happened."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu
    from transformers import BitsAndBytesConfig, WhisperForConditionalGeneration

    from loratune.asr.model import load_whisper
    from loratune.config import load_config
    from loratune.core.adapters import keep_4bit_layout

    model, _, _ = load_whisper(load_config(None, [f"model.name={tiny}", "quant.bits=4"]))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and not any(m.support_avx512bf16_for_cpu for m in layers)

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    raw = WhisperForConditionalGeneration.from_pretrained(tiny, quantization_config=q, device_map="cpu")
    layer = next(m for m in raw.modules() if isinstance(m, bnb.nn.Linear4bit) and m.out_features % 32 == 0)
    before = layer.weight.data.clone()
    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data, layer.weight.quant_state)
    assert layer.weight.quant_state.packing_format_for_cpu
    keep_4bit_layout(raw)
    assert not layer.weight.quant_state.packing_format_for_cpu and torch.equal(layer.weight.data, before)
    x = torch.randn(2, layer.in_features, requires_grad=True)
    layer.train()
    layer(x).sum().backward()  # the training kernel again: gradients reach the input
    assert x.grad is not None and torch.isfinite(x.grad).all()
