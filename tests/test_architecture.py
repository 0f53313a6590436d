"""One rule for each shared step, whichever wing runs it (the rules the two trainers used to
disagree on), one model-name resolver (the Gemma alias through merge, the portable base id), and
per-verb ``--help``."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from loratune.cli import main as cli
from loratune.config import load_config
from loratune.errors import ConfigError


@pytest.mark.parametrize("task", ["asr", "sft"])
def test_resume_without_a_checkpoint_stops_both_tasks(task, tmp_path):
    """ASR used to warn and start from scratch, SFT stopped: both stop now, before any data work."""
    from loratune.asr.train import train as train_asr
    from loratune.llm.train import train as train_sft

    cfg = load_config(None, [f"task={task}", f"train.output_dir={tmp_path / 'run'}", "train.resume=true",
                             "data.csv=/nonexistent.csv", "data.jsonl=/nonexistent.jsonl"])
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        (train_asr if task == "asr" else train_sft)(cfg)


def test_output_dir_that_is_a_file_is_refused(tmp_path):
    from loratune.core.training import resume_checkpoint

    f = tmp_path / "out"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        resume_checkpoint(load_config(None, [f"train.output_dir={f}"]))


def test_early_stopping_without_best_model_reload_is_an_error():
    """ASR used to drop the callback silently, SFT stopped: both stop now."""
    from loratune.core.training import training_callbacks

    cfg = load_config(None, ["train.early_stopping_patience=2"])
    with pytest.raises(ConfigError, match="early_stopping_patience needs train.load_best_model_at_end"):
        training_callbacks(cfg, load_best_model_at_end=False)
    names = [type(c).__name__ for c in training_callbacks(cfg, load_best_model_at_end=True)]
    assert "EarlyStoppingCallback" in names


def test_both_wings_run_the_one_skeleton():
    from loratune.asr.train import WING as ASR
    from loratune.llm.train import WING as SFT

    assert (ASR.task, SFT.task) == ("asr", "sft")
    assert {ASR.prepare, ASR.build_model, ASR.make_trainer}.isdisjoint({SFT.prepare, SFT.build_model, SFT.make_trainer})


@pytest.mark.parametrize("language", ["zh", "ja", "th", "en", "de", "chinese", None])
def test_training_and_evaluate_pick_the_same_metric(language):
    """train_asr had its own CER language list; training now asks core.metrics like evaluate does."""
    import numpy as np
    from transformers import EvalPrediction

    from loratune.asr.train import compute_metrics_for
    from loratune.core.metrics import metric_for

    class Tok:
        pad_token_id = 0
        language = None

        def batch_decode(self, ids, skip_special_tokens=True):
            return ["a b" for _ in ids]

    lang = "null" if language is None else language
    cfg = load_config(None, [f"whisper.language={lang}", "train.generate_during_eval=true"])
    fn = compute_metrics_for(cfg, type("P", (), {"tokenizer": Tok()})())
    got = fn(EvalPrediction(predictions=np.ones((1, 3), dtype=int), label_ids=np.ones((1, 3), dtype=int)))
    assert list(got) == [metric_for(language, "auto")]


def test_public_id_and_offline_mapping_of_packaged_weights(tmp_path, monkeypatch):
    from loratune.core import names

    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))
    built = tmp_path / "cache" / "models" / "whisper-base"
    assert names.public_id(str(built)) == "openai/whisper-base"
    assert names.public_id("whisper-base") == "openai/whisper-base"
    assert names.public_id(str(tmp_path / "cache" / "models" / "gemma3-270m-a5fd3b62230a")) == "google/gemma-3-270m"
    assert names.public_id("/some/local/model") == "/some/local/model"
    calls = []
    import loratune.asr.packaged as packaged

    monkeypatch.setattr(packaged, "ensure_packaged", lambda name: calls.append(name) or built)
    monkeypatch.setattr(names, "_in_hub_cache", lambda repo: False)
    assert names.resolve_model("openai/whisper-base") == str(built) and calls == ["whisper-base"]
    monkeypatch.setattr(names, "_in_hub_cache", lambda repo: True)  # a real Hub copy wins when there is one
    assert names.resolve_model("openai/whisper-base") == "openai/whisper-base"
    assert names.resolve_model("openai/whisper-small") == "openai/whisper-small"


def test_adapters_record_the_public_id(tmp_path):
    """What train writes: base_model_name_or_path is the public id, never a path inside a cache."""
    from peft import LoraConfig, get_peft_model
    from sft_tiny import make_tiny_llama
    from transformers import AutoModelForCausalLM

    from loratune.core.training import save_final

    base = make_tiny_llama(tmp_path / "base")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    trainer = type("T", (), {"model": model})()
    from transformers import AutoTokenizer

    save_final(trainer, AutoTokenizer.from_pretrained(base), tmp_path / "out", "openai/whisper-base")
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "openai/whisper-base"
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".final")]


def test_gemma_alias_through_merge(tmp_path, monkeypatch):
    """`loratune merge task=sft model.name=gemma3-270m` used to hand `gemma3-270m` to from_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from sft_tiny import make_tiny_llama
    from transformers import AutoModelForCausalLM

    import loratune.llm.model as llm_model

    base = make_tiny_llama(tmp_path / "gemma-stand-in", arch="gemma3")
    monkeypatch.setattr(llm_model, "packaged_gemma", lambda: base)  # the packaged build, without the 270M weights
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM", init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    assert cli(["merge", "task=sft", "model.name=gemma3-270m", f"model.adapter={tmp_path / 'adapter'}",
                f"merge.output_dir={out}"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft.eval()(ids).logits, atol=1e-4)
    assert json.loads((out / "loratune_merge.json").read_text())["base"] == "google/gemma-3-270m"


def test_help_shows_only_the_verbs_sections_with_choices(capsys):
    assert cli(["convert", "--help"]) == 0
    out = capsys.readouterr().out
    assert "convert.dtype (str, default 'float32'; one of: float32, float16, bfloat16)" in out
    assert "lora.r" not in out and "train.lr" not in out and "``" not in out
    assert cli(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "quant.bits (int, default 0; one of: 0, 4, 8)" in out and "lora.r" in out and "serve.port" not in out
    assert "samples/s" not in out and "tok/s" not in out  # measurements live in benchmarks/RESULTS.md


def test_liger_kernel_is_read(monkeypatch):
    """train.liger_kernel was documented but read by nothing."""
    from loratune.core.speed import check_device_support
    from loratune.core.trainer_args import common_training_kwargs

    cfg = load_config(None, ["train.liger_kernel=true"])
    assert common_training_kwargs(cfg.train, 8, "no")["use_liger_kernel"] is True
    with pytest.raises(ConfigError, match="liger_kernel=true needs a CUDA GPU"):
        check_device_support(cfg)


def test_one_cache_root(tmp_path, monkeypatch):
    from loratune.asr.features import default_cache_dir
    from loratune.core.names import cache_root

    monkeypatch.delenv("LORATUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "loratune" and default_cache_dir() == cache_root() / "features"
    monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "lt"))
    assert cache_root() == tmp_path / "lt" and default_cache_dir() == Path(tmp_path / "lt" / "features")


@pytest.mark.parametrize("task", ["asr", "sft"])
def test_one_rename_rule_for_both_wings(task, tmp_path):
    """A data.rename of a column the table lacks: ASR ignored it, SFT stopped; both stop now."""
    from loratune.errors import DataError

    path = tmp_path / "t.csv"
    path.write_text("ID,sentence,split\na.wav,你好,train\nb.wav,再见,dev\n", encoding="utf-8")
    cfg = load_config(None, [f"task={task}", f"data.csv={path}", "data.rename={nope: prompt}"])
    if task == "asr":
        from loratune.asr.sources import load_raw_splits as load
    else:
        from loratune.llm.data import split_train_eval as load
    with pytest.raises(DataError, match=r"data.rename names \['nope'\] but .*columns are \['ID', 'sentence', 'split'\]"):
        load(cfg.data)
