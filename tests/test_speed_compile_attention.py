"""The compiled / attention-kernel fast paths compute what the plain path computes, on the CPU.

Run: python -m pytest -q tests/test_speed_compile_attention.py

* ``train.compile_layers`` (regional ``torch.compile``): the training loss curve of a tiny Whisper +
  LoRA equals the eager one within 1e-4 relative (Inductor fuses element-wise work and may reorder
  float sums; LoRA dropout is off here because compiled dropout draws other random numbers).
* ``model.attn_implementation=flex_attention``: on packed sequences (``position_ids`` restarting at
  each document) a tiny Llama's logits equal SDPA's block-diagonal-mask logits within 1e-4. Flex
  attention has no CPU backward, so the training-loss check runs on the GPU in
  ``benchmarks/llm_sft_speed.py`` (same loss to 4 digits, benchmarks/RESULTS.md).
* ``train.cuda_graphs``: the routed layers (graph replays in training, plain compiled kernels in
  evaluation) and the precomputed 4-D decoder mask follow the eager loss curve; on a CPU the
  graphs themselves are skipped by torch, so the GPU loss check (15 steps, same seed, no dropout)
  is ``benchmarks/whisper_train_speed.py --loss-curve 15`` (benchmarks/RESULTS.md).
* the device pre-flight refuses what this machine cannot run, in one line (and the config loader
  refuses an unknown ``model.sdpa_backend``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sft_tiny import make_tiny_llama
from test_speed_paths import lora_model, train_curve

from loratune.asr.speed import precompute_causal_mask
from loratune.config import load_config
from loratune.core.speed import check_device_support, compile_layers
from loratune.errors import ConfigError

torch.set_num_threads(1)


def test_compiled_layers_follow_the_eager_loss_curve(tiny):
    torch._dynamo.reset()
    eager = train_curve(lora_model(tiny), steps=4)
    model = lora_model(tiny)
    assert compile_layers(model) == 4  # 2 encoder + 2 decoder layers
    compiled = train_curve(model, steps=4)
    assert eager[-1] < eager[0]  # it trains
    np.testing.assert_allclose(compiled, eager, rtol=1e-4)


def test_precomputed_causal_mask_changes_nothing_but_the_sync(tiny):
    """Same loss and gradients as transformers' own mask, and the decoder really gets the 4-D mask."""
    from test_speed_paths import LABELS, features

    def loss_and_grads(model):
        model.train()
        loss = model(input_features=features(), labels=LABELS).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ref_loss, ref_grads = loss_and_grads(lora_model(tiny))
    model = lora_model(tiny)
    decoder = model.get_base_model().model.decoder
    precompute_causal_mask(decoder)
    seen = []
    decoder.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[1]))  # (hidden, mask, ...)
    loss, grads = loss_and_grads(model)
    assert seen[0] is not None and seen[0].dim() == 4 and seen[0].dtype == torch.bool
    assert not seen[0][0, 0, 0, 1] and seen[0][0, 0, 1, 0]  # causal: no look-ahead
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_cuda_graph_routing_follows_the_eager_loss_curve(tiny):
    """The routed encoder layers train like eager ones; evaluation takes the plain compiled path."""
    torch._dynamo.reset()
    eager = train_curve(lora_model(tiny), steps=4)
    model = lora_model(tiny)
    base = model.get_base_model()
    assert compile_layers(model, graph_layers=list(base.model.encoder.layers)) == 4
    precompute_causal_mask(base.model.decoder)
    routed = train_curve(model, steps=4)
    np.testing.assert_allclose(routed, eager, rtol=1e-4)
    layer = base.model.encoder.layers[0]
    assert layer._compiled_call_impl.__name__ == "call"  # routed, not nn.Module.compile's own
    model.eval()
    from test_speed_paths import LABELS, features

    with torch.no_grad():  # the evaluation path compiles and runs too
        assert torch.isfinite(model(input_features=features(), labels=LABELS).loss)


def packed_batch(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 48), generator=g)
    lengths = [[20, 28], [9, 17, 22]]  # documents per row
    pos = torch.tensor([[p for n in row for p in range(n)] for row in lengths])
    return ids, pos


def test_flex_attention_matches_sdpa_on_packed_sequences(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny_llama(tmp_path / "llama")
    ref = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    fast = AutoModelForCausalLM.from_pretrained(path, attn_implementation="flex_attention", dtype=torch.float32).eval()
    ids, pos = packed_batch(ref.config.vocab_size)
    with torch.no_grad():
        a = ref(input_ids=ids, position_ids=pos).logits
        b = fast(input_ids=ids, position_ids=pos).logits
        # the packing is real: without position_ids the second document sees the first one
        c = ref(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert (c[:, 20:] - a[:, 20:]).abs().max() > 1e-3


def test_preflight_refuses_flex_training_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: flex attention trains here")
    cfg = load_config(None, ["task=sft", "model.attn_implementation=flex_attention"])
    with pytest.raises(ConfigError, match="flex_attention trains only on a CUDA GPU"):
        check_device_support(cfg)


def test_config_refuses_unknown_sdpa_backend():
    """Checked when the config loads, so every verb (transcribe too) refuses it before any work."""
    with pytest.raises(ConfigError, match=r"config key 'model.sdpa_backend' = 'fastest'; choose one of null, cudnn, flash, efficient$"):
        load_config(None, ["model.sdpa_backend=fastest"])


def test_gpu_recipes_load_and_pass_preflight_here():
    """The shipped GPU recipes turn the fast paths on and still pass the pre-flight on a CPU
    (the GPU-only levers are skipped there with a log line, see apply_training_speed)."""
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    turbo = load_config(configs / "whisper-large-v3-turbo-zh-qlora.yaml")
    assert (turbo.train.bf16, turbo.train.dequantize_base, turbo.train.compile_layers, turbo.model.sdpa_backend) == (True, True, True, "cudnn")
    phi3 = load_config(configs / "phi3-mini-yoda-qlora.yaml")
    assert phi3.quant.compute_dtype == "bfloat16" and phi3.train.compile_layers and not phi3.train.gradient_checkpointing
    for cfg in (turbo, phi3):
        check_device_support(cfg)


def test_sft_keeps_partial_checkpointing():
    """The Trainer would re-enable checkpointing on every layer; with checkpoint_fraction < 1 it must not."""
    from loratune.llm.train import sft_args

    cfg = load_config(None, ["task=sft", "train.gradient_checkpointing=true", "train.checkpoint_fraction=0.25",
                             "train.report_to=[none]", "train.output_dir=/tmp/unused"])
    assert sft_args(cfg, 100).activation_checkpointing is False
    cfg.train.checkpoint_fraction = 1.0
    assert sft_args(cfg, 100).activation_checkpointing is True


def test_gpu_recipe_speed_settings_still_train_on_a_cpu(tiny):
    """configs/whisper-large-v3-turbo-zh-qlora.yaml on a machine without CUDA: bf16 frozen weights
    would meet fp32 inputs (no autocast there), so apply_training_speed keeps them fp32 and skips
    the GPU-only levers; a training step runs."""
    from pathlib import Path

    from loratune.asr.speed import apply_training_speed

    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "whisper-large-v3-turbo-zh-qlora.yaml", ["quant.bits=0"])
    model = lora_model(tiny)
    done = apply_training_speed(model, cfg)
    assert "compiled_layers" not in done and "sdpa_backend" not in done
    assert all(p.dtype == torch.float32 for p in model.parameters())
    losses = train_curve(model, steps=2)
    assert np.isfinite(losses).all()


def test_generate_runs_on_bf16_frozen_weights_outside_autocast(tiny):
    """``train.frozen_dtype=bfloat16`` + ``train.generate_during_eval``: the evaluation's ``generate``
    runs without autocast, so fp32 log-mels met bf16 convolution weights (a dtype error at the
    first evaluation, found on the H100). The encoder now casts its input to its weights' dtype."""
    from test_speed_paths import features

    from loratune.asr.speed import match_encoder_input_dtype
    from loratune.core.speed import cast_frozen

    model = lora_model(tiny)
    cast_frozen(model, torch.bfloat16)
    model.eval()
    feats = features()[:2]
    kw = dict(input_features=feats, max_new_tokens=3, decoder_start_token_id=50258)
    with torch.no_grad(), pytest.raises(RuntimeError, match="should be the same"):
        model.generate(**kw)
    assert match_encoder_input_dtype(model)
    with torch.no_grad():
        out = model.generate(**kw)
    assert out.shape[0] == 2
