"""loratune merge: adapters trained on fp32 / 8-bit / 4-bit bases -> standalone models; causal LMs too."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_tiny_lora_adapter, make_tiny_whisper

from loratune.config import load_config
from loratune.core.audio import load_audio
from loratune.errors import ModelError
from loratune.merge import merge

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("tiny") / "whisper")


@pytest.fixture(scope="module")
def clip(hsk_dir) -> np.ndarray:
    return load_audio(hsk_dir / "audio" / "hsk1-0002.mp3")


def _features(base_dir, audio):
    from transformers import WhisperProcessor

    return WhisperProcessor.from_pretrained(str(base_dir))(audio, sampling_rate=16000, return_tensors="pt").input_features


def _greedy(model, feats):
    with torch.no_grad():
        return model.generate(input_features=feats, language="zh", task="transcribe", max_new_tokens=12)


@pytest.mark.parametrize("bits", [4, 8])
def test_merge_adapter_trained_on_quantised_base(base, clip, tmp_path, bits):
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration, pipeline

    adapter = make_tiny_lora_adapter(base, tmp_path / f"adapter{bits}", bits=bits, steps=2)
    cfg = load_config(None, [f"model.name={base}", f"model.adapter={adapter}", f"quant.bits={bits}"])
    out = merge(cfg, str(tmp_path / "merged"))
    saved = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in saved  # a plain, de-quantised model
    assert (out / "model.safetensors").is_file() and (out / "generation_config.json").is_file()
    assert json.loads((out / "loratune_merge.json").read_text())["trained_quant_bits"] == bits

    feats = _features(base, clip)
    reference = PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(str(base)), str(adapter)).eval()
    merged = WhisperForConditionalGeneration.from_pretrained(str(out)).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    dec = torch.tensor([[50258, 50260, 50359, 50363]])
    with torch.no_grad():
        a = reference(input_features=feats, decoder_input_ids=dec).logits
        m = merged(input_features=feats, decoder_input_ids=dec).logits
        plain = WhisperForConditionalGeneration.from_pretrained(str(base))(input_features=feats, decoder_input_ids=dec).logits
    assert (a - plain).abs().max() > 1e-3  # the adapter really changes the model ...
    torch.testing.assert_close(m, a, atol=1e-4, rtol=1e-4)  # ... and the merge reproduces it
    assert torch.equal(_greedy(merged, feats), _greedy(reference, feats))

    # the standalone dir is what transformers' ASR pipeline loads; same text as the pipeline run
    # on the tutorial-style PeftModel (same pre-processing on both sides)
    kw = {"generate_kwargs": {"language": "zh", "task": "transcribe", "max_new_tokens": 12}}
    asr = pipeline("automatic-speech-recognition", model=str(out), device="cpu")
    asr_adapter = pipeline("automatic-speech-recognition", model=reference, tokenizer=asr.tokenizer, feature_extractor=asr.feature_extractor, device="cpu")
    text = asr(clip.copy(), **kw)["text"]
    assert text.strip() and text == asr_adapter(clip.copy(), **kw)["text"]


def test_merge_refuses_pickled_adapter(base, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    model = get_peft_model(WhisperForConditionalGeneration.from_pretrained(str(base)), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(str(tmp_path / "pickled"), safe_serialization=False)
    assert (tmp_path / "pickled" / "adapter_model.bin").is_file()
    cfg = load_config(None, [f"model.name={base}", f"model.adapter={tmp_path / 'pickled'}"])
    with pytest.raises(ModelError, match="pickle"):
        merge(cfg, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", [{"encoder_ffn_dim": 96, "decoder_ffn_dim": 96}, {"encoder_layers": 1}])
def test_merge_refuses_adapter_of_another_base(base, tmp_path, change):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    adapter = make_tiny_lora_adapter(base, tmp_path / "adapter", steps=0)
    config = WhisperConfig.from_pretrained(str(base))
    for k, v in change.items():
        setattr(config, k, v)
    other = tmp_path / "other"
    WhisperForConditionalGeneration(config).save_pretrained(str(other))
    cfg = load_config(None, [f"model.name={other}", f"model.adapter={adapter}"])
    with pytest.raises(ModelError, match="trained on"):
        merge(cfg, str(tmp_path / "out"))


def test_merge_causal_lm_via_cli(tmp_path):
    from peft import LoraConfig, get_peft_model
    from tiny import whisper_tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from loratune.cli import main

    tok = whisper_tokenizer()
    base_dir = tmp_path / "llama"
    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    llm.save_pretrained(str(base_dir))
    tok.save_pretrained(str(base_dir))
    peft_model = get_peft_model(llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False, task_type="CAUSAL_LM"))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    out = tmp_path / "merged"
    # task=asr on the command line: the adapter's task_type (CAUSAL_LM) decides the model class
    assert main(["merge", f"model.name={base_dir}", f"model.adapter={tmp_path / 'adapter'}", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    assert AutoTokenizer.from_pretrained(str(out)).decode([400, 401]) == tok.decode([400, 401])
    assert main(["merge", f"model.name={base_dir}", str(out)]) == 2  # no adapter: clear error, exit 2


@pytest.mark.slow
def test_merge_real_whisper_base_4bit_adapter(hsk_dir, tmp_path):
    """Packaged whisper-base: adapter trained 2 steps on an NF4 base, merged into the fp32 base;
    the merged model transcribes real clips exactly like base + adapter."""
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    from loratune.asr.transcriber import Transcriber
    from loratune.core.names import resolve_model

    base = resolve_model("whisper-base")
    adapter = make_tiny_lora_adapter(base, tmp_path / "adapter", bits=4, steps=2)
    cfg = load_config(None, ["model.name=whisper-base", f"model.adapter={adapter}", "quant.bits=4"])
    out = merge(cfg, str(tmp_path / "merged"))
    clips = [load_audio(hsk_dir / "audio" / f"hsk1-000{i}.mp3") for i in (1, 2, 3)]
    tuned = PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(base), str(adapter)).eval()
    merged_cfg = load_config(None, [f"model.name={out}"])
    merged_tr = Transcriber.from_config(merged_cfg)
    tuned_tr = Transcriber(tuned, merged_tr.processor, "zh")
    merged_text = [t.text for t in merged_tr(clips, max_new_tokens=40)]
    assert merged_text == [t.text for t in tuned_tr(clips, max_new_tokens=40)]
    assert all(merged_text)
