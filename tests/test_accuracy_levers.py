"""The accuracy levers are really applied: SpecAugment masks training features, DoRA / rsLoRA /
PiSSA reach PEFT, label smoothing changes the Whisper loss by the textbook formula."""
from __future__ import annotations

import torch

from loratune.config import load_config


def test_spec_augment_masks_only_in_training(tiny):
    from loratune.asr.model import load_whisper

    cfg = load_config(None, [f"model.name={tiny}", "whisper.spec_augment=true", "whisper.mask_time_prob=0.5",
                             "whisper.mask_feature_prob=0.3"])
    model, _, _ = load_whisper(cfg, for_training=True)
    assert model.config.apply_spec_augment and model.config.mask_time_prob == 0.5
    x = torch.ones(2, model.config.num_mel_bins, 300)
    model.train()
    masked = model.model._mask_input_features(x.clone())
    assert (masked == 0).float().mean() > 0.1
    model.eval()
    assert torch.equal(model.model._mask_input_features(x.clone()), x)
    plain, _, _ = load_whisper(load_config(None, [f"model.name={tiny}"]), for_training=True)
    assert not plain.config.apply_spec_augment


def test_dora_rslora_and_init_reach_peft(tiny):
    from transformers import WhisperForConditionalGeneration

    from loratune.core.adapters import attach_lora

    for over, check in ((["lora.use_dora=true"], lambda c: c.use_dora),
                        (["lora.use_rslora=true"], lambda c: c.use_rslora),
                        (["lora.init=pissa"], lambda c: c.init_lora_weights == "pissa")):
        model = WhisperForConditionalGeneration.from_pretrained(tiny)
        peft = attach_lora(model, load_config(None, [f"model.name={tiny}", *over]), task_type=None)
        assert check(peft.peft_config["default"]), over
    assert any("lora_magnitude_vector" in n for n, _ in attach_lora(
        WhisperForConditionalGeneration.from_pretrained(tiny), load_config(None, ["lora.use_dora=true"]), task_type=None).named_parameters())


def test_label_smoothing_in_the_whisper_loss():
    from loratune.asr.train import token_mean_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, -100, -100], [3, 4, 5, 6]])
    eps = 0.1
    logp = logits.log_softmax(-1)
    keep = labels != -100
    nll = -logp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    smooth = -logp.mean(-1)
    expected = (((1 - eps) * nll + eps * smooth)[keep]).sum() / keep.sum()
    got = token_mean_loss({"logits": logits}, labels, label_smoothing=eps)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(got, token_mean_loss({"logits": logits}, labels))
