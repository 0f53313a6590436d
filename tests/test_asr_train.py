"""Whisper LoRA/QLoRA training end to end on a tiny random Whisper and real HSK clips (CPU, offline).

4-bit and 8-bit bases train a few steps; the adapter reloads through the tutorials' code path and
transcribes; configuration mistakes stop before training; a SIGKILLed CLI run resumes from its
last checkpoint. Run: python -m pytest -q tests/test_asr_train.py
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_asr_data import hsk_clips, write_csv
from tiny import tiny_asr_overrides

from loratune.asr.train import train
from loratune.cli import main
from loratune.config import load_config
from loratune.core.trainer_args import last_complete_checkpoint
from loratune.errors import ConfigError

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "whisper-base-hsk-qlora.yaml"


@pytest.fixture(scope="module")
def clips_csv(hsk_csv):
    return hsk_csv(8)


def run_cfg(tiny, clips_csv, hsk_dir, out, *overrides):
    return load_config(RECIPE, tiny_asr_overrides(tiny, clips_csv, hsk_dir, out) + list(overrides))


def test_qlora_4bit_trains_saves_and_reloads_like_the_tutorials(tiny, clips_csv, hsk_dir, tmp_path):
    out = tmp_path / "run4"
    cfg = run_cfg(tiny, clips_csv, hsk_dir, out, "quant.bits=4", "whisper.trim_audio=true", "train.max_steps=4",
                  "train.eval_strategy=steps", "train.eval_steps=2", "train.early_stopping_patience=3",
                  "train.report_to=[tensorboard]")
    summary = train(cfg)
    assert summary["global_step"] == 4 and summary["best_metric"] is not None
    assert summary["trainable_params"] > 0 and summary["train_samples_per_second"] > 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "loratune_config.yaml", "loss.png", "summary.json",
                 "processor_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("adapter_model.bin")) and any((out / "runs").rglob("events.out.tfevents*"))
    assert json.loads((out / "summary.json").read_text())["global_step"] == 4
    card = (out / "README.md").read_text()  # loratune's model card, not PEFT's template
    assert "More Information Needed" not in card and f"base_model: {tiny}" in card and "r 8, alpha 16" in card
    assert load_config(out / "loratune_config.yaml").quant.bits == 4  # resolved config round-trips
    from transformers import WhisperProcessor

    assert WhisperProcessor.from_pretrained(str(out)).feature_extractor.feature_size == 80  # processor saved beside

    # the tutorials' reload path, verbatim
    from peft import PeftConfig, PeftModel
    from transformers import AutomaticSpeechRecognitionPipeline, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer

    from loratune.core.audio import load_audio

    peft_config = PeftConfig.from_pretrained(str(out))
    assert Path(peft_config.base_model_name_or_path) == Path(tiny)
    base = WhisperForConditionalGeneration.from_pretrained(peft_config.base_model_name_or_path)
    model = PeftModel.from_pretrained(base, str(out))
    tokenizer = WhisperTokenizer.from_pretrained(peft_config.base_model_name_or_path, language="zh", task="transcribe")
    feature_extractor = WhisperFeatureExtractor.from_pretrained(peft_config.base_model_name_or_path)
    pipe = AutomaticSpeechRecognitionPipeline(model=model, tokenizer=tokenizer, feature_extractor=feature_extractor)
    audio = load_audio(hsk_dir / "audio" / hsk_clips(hsk_dir, 1)[0][0])
    result = pipe({"raw": audio, "sampling_rate": 16000}, generate_kwargs={"language": "zh", "task": "transcribe", "max_new_tokens": 6})
    assert isinstance(result["text"], str)
    # the trained adapter really is in the reloaded model: LoRA B matrices left their zero init
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())


def test_int8_base_trains_a_few_steps(tiny, clips_csv, hsk_dir, tmp_path):
    out = tmp_path / "run8"
    cfg = run_cfg(tiny, clips_csv, hsk_dir, out, "quant.bits=8", "whisper.trim_audio=false", "train.max_steps=2",
                  "train.eval_strategy=no", "train.report_to=[none]")
    summary = train(cfg)
    assert summary["global_step"] == 2 and (out / "adapter_model.safetensors").is_file()
    from loratune.asr.model import load_whisper

    for bits, cls in ((8, "Linear8bitLt"), (4, "Linear4bit")):  # the base really is quantised as asked
        model, _, _ = load_whisper(load_config(None, [f"model.name={tiny}", f"quant.bits={bits}", "quant.compute_dtype=float32"]))
        assert type(model.model.encoder.layers[0].fc1).__name__ == cls
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8


def test_cpu_bf16_trains_under_autocast_with_a_float32_adapter(tiny, clips_csv, hsk_dir, tmp_path, monkeypatch):
    """train.cpu_bf16: forwards in bf16 on a CPU that has it, adapter and optimiser in float32;
    a CPU without native bf16 trains in float32."""
    from torch.nn.modules.module import register_module_forward_hook

    import loratune.core.speed as speed
    from loratune.core.trainer_args import common_training_kwargs

    def linear_output_dtypes(native: bool, *overrides):
        """dtypes of every nn.Linear output while training 2 steps (the Trainer hands fp32 logits on)."""
        monkeypatch.setattr(speed, "cpu_native_bf16", lambda: native)  # CI's CPU may lack it (oneDNN emulates)
        seen = set()
        hook = register_module_forward_hook(lambda m, i, o: seen.add(o.dtype) if isinstance(m, torch.nn.Linear) else None)
        try:
            summary = train(run_cfg(tiny, clips_csv, hsk_dir, out, "whisper.trim_audio=true", "train.max_steps=2",
                                    "train.eval_strategy=no", "train.report_to=[none]", *overrides))
        finally:
            hook.remove()
        return seen, summary

    out = tmp_path / "fp32"
    seen, summary = linear_output_dtypes(False, "train.cpu_bf16=true")  # asked for, CPU without it: float32
    assert seen == {torch.float32} and "cpu_bf16_autocast" not in summary["speed"]
    out = tmp_path / "bf16"
    seen, summary = linear_output_dtypes(True, "train.cpu_bf16=true")
    assert seen == {torch.bfloat16} and summary["speed"].get("cpu_bf16_autocast") is True
    cfg = load_config(out / "loratune_config.yaml")
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert {v.dtype for v in saved.values()} == {torch.float32} and all(torch.isfinite(v).all() for v in saved.values())
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in saved.items())  # it trained
    assert common_training_kwargs(cfg.train, 8, "no")["bf16"] is True
    monkeypatch.setattr(speed, "cpu_native_bf16", lambda: False)
    assert common_training_kwargs(cfg.train, 8, "no")["bf16"] is False  # no native bf16: float32
    monkeypatch.setattr(speed, "cpu_native_bf16", lambda: True)
    assert common_training_kwargs(run_cfg(tiny, clips_csv, hsk_dir, out, "train.cpu_bf16=false").train, 8, "no")["bf16"] is False


def test_cpu_native_bf16_reads_the_cpu_flags(tmp_path):
    from loratune.core.speed import cpu_native_bf16

    for flags, expected in (("fpu avx2 avx512f", False), ("fpu avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True)):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert cpu_native_bf16(str(info)) is expected, flags
    assert cpu_native_bf16(str(tmp_path / "missing")) is False


def test_target_module_matching_nothing_stops_before_training(tiny, clips_csv, hsk_dir, tmp_path):
    out = tmp_path / "badtarget"
    cfg = run_cfg(tiny, clips_csv, hsk_dir, out, "quant.bits=0", "lora.target_modules=[q_proj,qkv_proj]", "train.report_to=[none]")
    with pytest.raises(ConfigError) as info:
        train(cfg)
    msg = str(info.value)
    assert "['qkv_proj']" in msg and "fc1" in msg and "v_proj" in msg.replace("qkv_proj", "")  # lists the real layers
    assert "\n" not in msg and not list(out.glob("checkpoint-*"))


def test_cli_bad_inputs_exit_2_with_one_line(tiny, hsk_dir, tmp_path, capsys):
    bad = write_csv(tmp_path / "bad.csv", [("hsk1-0001.mp3", "老师，您好！"), ("nope.mp3", "不在"), ("hsk1-0002.mp3", "你好")])
    args = ["train", str(RECIPE), f"model.name={tiny}", f"data.csv={bad}", f"data.audio_dir={hsk_dir / 'audio'}",
            "data.eval_split=null", f"data.cache_dir={tmp_path / 'cache'}", f"train.output_dir={tmp_path / 'out'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.csv line 3" in err[0] and "nope.mp3" in err[0] and "skip_bad_rows" in err[0]
    assert not (tmp_path / "out").exists()  # stopped before the trainer was even built
    assert main(["train", str(RECIPE), "train.learning_rate=1"]) == 2
    assert "train.learning_rate" in capsys.readouterr().err


def test_resume_after_sigkill_continues_from_the_last_checkpoint(tiny, tmp_path):
    """The shipped recipe through the real CLI (tiny model, 16 HSK train clips), killed with
    SIGKILL after its first checkpoint, then resumed with --resume."""
    out = tmp_path / "resume"
    max_steps = 12
    cmd = [sys.executable, "-m", "loratune", "train", str(RECIPE), f"model.name={tiny}",
           "data.max_train_samples=16", "data.max_eval_samples=2", f"data.cache_dir={tmp_path / 'cache'}",
           f"train.output_dir={out}", "train.batch_size=2", f"train.max_steps={max_steps}",
           "train.eval_strategy=steps", "train.eval_steps=3", "train.save_total_limit=2",
           "train.report_to=[none]", "train.threads=1", "train.logging_steps=1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log1, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    try:
        while last_complete_checkpoint(out) is None:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()  # killed mid-run, not finished
    ckpt = last_complete_checkpoint(out)  # (a save cut off by the kill has no trainer_state.json)
    step = int(ckpt.name.split("-")[1])
    assert 0 < step < max_steps

    second = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-1500:] + second.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == step and summary["global_step"] == max_steps
    assert summary["feature_cache_hit"] is True  # the second run did not re-process the clips
    assert "feature cache hit" in second.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()
    state = json.loads((out / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
    logged = [e["step"] for e in state["log_history"] if "loss" in e]
    assert logged[:step] == list(range(1, step + 1))  # history before the kill carried over
    assert logged == list(range(1, max_steps + 1))  # and every step after it ran exactly once
