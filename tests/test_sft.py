"""Causal-LM SFT: data formats, masking, bad input, a 4-bit CPU run, generate, evaluate (tiny models, offline)."""
from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_tiny import make_tiny_llama, make_tokenizer  # noqa: E402

from loratune.cli import main  # noqa: E402
from loratune.config import load_config  # noqa: E402
from loratune.errors import ConfigError, DataError  # noqa: E402
from loratune.llm.data import (  # noqa: E402
    INSTRUCTION_TEMPLATE,
    build_sft_datasets,
    encode_example,
    resolve_template,
    split_train_eval,
)

PAIRS = [("你好", "Hello."), ("谢谢你！", "Thank you!"), ("对不起。", "Sorry."), ("老师，您好！", "Hello, teacher!"),
         ("没关系。", "It's okay."), ("不客气。", "You're welcome.")]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return path


def _cfg(overrides, tmp_path=None):
    return load_config(None, ["task=sft", "train.report_to=[none]", "train.threads=1", *overrides])


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer(chat_template=True)


# ---------------------------------------------------------------- data formats and masking


def test_instruction_masking_covers_exactly_the_completion(tok):
    sft = _cfg(["sft.template=instruction"]).sft
    ids, n = encode_example(tok, sft, "instruction", "我喜欢喝茶。", "I like to drink tea.")
    assert ids[-1] == tok.eos_token_id and ids[0] == tok.bos_token_id
    assert tok.decode(ids[:n], skip_special_tokens=True) == INSTRUCTION_TEMPLATE.format(prompt="我喜欢喝茶。")
    assert tok.decode(ids[n:], skip_special_tokens=True) == "I like to drink tea."


def test_chat_masking_and_system_prompt(tok):
    sft = _cfg(["sft.template=chat", "sft.system_prompt=Be brief."]).sft
    ids, n = encode_example(tok, sft, "chat", "你好", "Hello.")
    text = tok.decode(ids)
    assert text.startswith("<s><|system|>\nBe brief.<|end|>\n<|user|>\n你好<|end|>\n<|assistant|>\n")
    assert tok.decode(ids[n:]) == "Hello.<|end|>\n"


def test_prompt_format_and_labels(tmp_path, tok):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    cfg = _cfg([f"data.jsonl={data}", "sft.template=instruction", "sft.prompt_format='Translate to English: {prompt}'",
                "data.eval_ratio=0.34"])
    train, evald, report = build_sft_datasets(cfg, tok)
    assert report["template"] == "instruction" and len(train) + len(evald) == len(PAIRS)
    row = train[0]
    assert "Translate to English: " in tok.decode(row["input_ids"])
    masked = [t for t, l in zip(row["input_ids"], row["labels"]) if l == -100]
    learned = [l for l in row["labels"] if l != -100]
    assert learned == row["input_ids"][len(masked):] and learned[-1] == tok.eos_token_id
    assert "### Response:" in tok.decode(masked) and "### Response" not in tok.decode(learned)
    full = _cfg([f"data.jsonl={data}", "sft.template=instruction", "sft.completion_only_loss=false"])
    train_full, _, _ = build_sft_datasets(full, tok)
    assert all(r["labels"] == r["input_ids"] for r in train_full)


def test_messages_csv_disk_renames_and_split_column(tmp_path, tok):
    # chat messages from JSONL: the last assistant turn is the answer
    msgs = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in PAIRS]
    cfg = _cfg([f"data.jsonl={_jsonl(tmp_path / 'm.jsonl', msgs)}"])
    train, _, report = build_sft_datasets(cfg, tok)
    assert report["template"] == "chat"
    assert tok.decode([t for t, l in zip(train[0]["input_ids"], train[0]["labels"]) if l != -100]).endswith("<|end|>\n")
    # CSV with a split column (HSK layout): only train rows train, dev rows evaluate; renames + removals
    path = tmp_path / "meta.csv"
    with path.open("w", encoding="utf-8-sig", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["ID", "sentence", "split", "english", "speed"])
        for i, (p, c) in enumerate(PAIRS):
            w.writerow([f"a{i}.mp3", p, "dev" if i % 3 == 0 else "train", c, "normal"])
    cfg = _cfg([f"data.csv={path}", "data.eval_split=dev", "data.rename={sentence: prompt, english: completion}",
                "data.remove_columns=[speed]"])
    train_raw, eval_raw = split_train_eval(cfg.data)
    assert set(train_raw["split"]) == {"train"} and set(eval_raw["split"]) == {"dev"}
    assert "speed" not in train_raw.column_names and len(train_raw) == 4 and len(eval_raw) == 2
    # save_to_disk DatasetDict with named splits
    from datasets import Dataset, DatasetDict

    dd = DatasetDict({"train": Dataset.from_list([{"prompt": p, "completion": c} for p, c in PAIRS[:4]]),
                      "test": Dataset.from_list([{"prompt": p, "completion": c} for p, c in PAIRS[4:]])})
    dd.save_to_disk(str(tmp_path / "disk"))
    cfg = _cfg([f"data.disk={tmp_path / 'disk'}", "data.eval_split=test"])
    train, evald, _ = build_sft_datasets(cfg, tok)
    assert (len(train), len(evald)) == (4, 2)


def test_hsk_recipe_trains_on_train_rows_only(repo_root, hsk_dir, tok, monkeypatch):
    monkeypatch.chdir(repo_root)  # the recipe's data path is relative to the checkout
    cfg = load_config(repo_root / "configs" / "gemma3-270m-hsk-zh-en-lora.yaml")
    train_raw, eval_raw = split_train_eval(cfg.data)
    assert set(train_raw["split"]) == {"train"} and set(eval_raw["split"]) == {"dev"}
    assert len(train_raw) == cfg.data.max_train_samples and {"prompt", "completion"} <= set(train_raw.column_names)
    ids, n = encode_example(tok, cfg.sft, "instruction", train_raw[0]["prompt"], train_raw[0]["completion"])
    assert "Translate to English: " + train_raw[0]["prompt"] in tok.decode(ids[:n])


def test_clean_answer_cuts_at_the_next_section():
    from loratune.llm.generation import clean_answer

    assert clean_answer(" I like tea.\n\n### Answer:\nI like", "instruction") == "I like tea."
    assert clean_answer("I like tea.\n\n###", "instruction") == "I like tea."  # generation stops on the marker
    assert clean_answer("a ### b", "chat") == "a ### b"


# ---------------------------------------------------------------- bad input: clear, early errors


def test_missing_columns_names_them_and_the_fix(tmp_path, tok):
    cfg = _cfg([f"data.jsonl={_jsonl(tmp_path / 'd.jsonl', [{'sentence': 'a', 'translation': 'b'}] * 4)}"])
    with pytest.raises(DataError, match=r"columns \['sentence', 'translation'\].*data.rename"):
        build_sft_datasets(cfg, tok)


def test_empty_completion_names_the_row(tmp_path, tok):
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS] + [{"prompt": "再见", "completion": "  "}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    cfg = _cfg([f"data.jsonl={path}", "data.eval_ratio=0.5"])
    with pytest.raises(DataError, match="empty 'completion'.*skip_bad_rows"):
        build_sft_datasets(cfg, tok)
    train, evald, report = build_sft_datasets(_cfg([f"data.jsonl={path}", "data.eval_ratio=0.5", "data.skip_bad_rows=true"]), tok)
    assert report["train"]["bad_rows"] + report["eval"]["bad_rows"] == 1 and len(train) + len(evald) == len(PAIRS)


def test_too_long_is_truncated_or_dropped_and_counted(tmp_path, tok, caplog):
    rows = [{"prompt": p, "completion": c} for p, c in PAIRS] + [{"prompt": "你好", "completion": "Hello, teacher! " * 20},
                                                                  {"prompt": "老师，您好！" * 30, "completion": "Hi."}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    base = [f"data.jsonl={path}", "data.eval_ratio=0.2", "data.seed=1", "sft.max_length=48", "sft.template=instruction"]
    _, _, rep = build_sft_datasets(_cfg(base + ["sft.too_long=truncate"]), tok)
    counted = {k: rep["train"][k] + rep["eval"][k] for k in ("truncated", "dropped_too_long", "prompt_too_long")}
    assert counted == {"truncated": 1, "dropped_too_long": 0, "prompt_too_long": 1}
    assert "exceed sft.max_length=48" in caplog.text
    train, evald, rep = build_sft_datasets(_cfg(base + ["sft.too_long=drop"]), tok)
    assert rep["train"]["dropped_too_long"] + rep["eval"]["dropped_too_long"] == 2
    assert max(len(r["input_ids"]) for r in list(train) + list(evald)) <= 48


def test_chat_template_missing_is_a_config_error():
    plain = make_tokenizer(chat_template=False)
    sft = _cfg(["sft.template=chat"]).sft
    with pytest.raises(ConfigError, match="no chat template.*sft.template=instruction"):
        resolve_template(plain, sft, "tiny")
    assert resolve_template(plain, _cfg([]).sft) == "instruction"


def test_unknown_target_module_lists_real_layers(tmp_path, tiny_llama):
    from loratune.core.adapters import attach_lora
    from loratune.llm.model import load_causal_lm

    cfg = _cfg([f"model.name={tiny_llama}", "lora.target_modules=[query_key_value]"])
    with pytest.raises(ConfigError, match=r"query_key_value.*match nothing.*q_proj.*v_proj"):
        attach_lora(load_causal_lm(cfg, trainable=True), cfg, "CAUSAL_LM")


def test_bad_model_paths(tmp_path):
    from loratune.errors import ModelError
    from loratune.llm.model import resolve_causal

    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_causal(str(tmp_path / "x.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="without config.json"):
        resolve_causal(str(tmp_path / "empty"))
    (tmp_path / "empty" / "adapter_config.json").write_text("{}")
    with pytest.raises(ModelError, match="is a LoRA adapter: pass it as model.adapter"):
        resolve_causal(str(tmp_path / "empty"))


# ---------------------------------------------------------------- end to end on tiny models


@pytest.mark.parametrize("arch, targets", [("llama", "[q_proj,v_proj]"), ("phi3", "[qkv_proj,o_proj]"), ("gemma3", "[q_proj,v_proj]")])
def test_qlora_sft_on_cpu_saves_adapter_generates_and_evaluates(tmp_path, arch, targets, capsys):
    model_dir = make_tiny_llama(tmp_path / arch, arch=arch)
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS * 3])
    out = tmp_path / "run"
    common = ["task=sft", f"model.name={model_dir}", f"data.jsonl={data}", "quant.bits=4", "quant.compute_dtype=float32",
              f"lora.target_modules={targets}", "train.report_to=[none]", "train.threads=1"]
    if arch == "gemma3":  # the instruction template end to end (stop strings, answer cutting)
        common.append("sft.template=instruction")
    rc = main(["train", *common, "train.max_steps=4", "train.batch_size=4", "train.lr=1e-2", f"train.output_dir={out}",
               "train.warmup_epochs=0.5", "train.early_stopping_patience=2", "train.eval_strategy=steps", "train.eval_steps=2"])
    assert rc == 0
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "loratune_config.yaml", "loss.png", "summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 4 and summary["trainable_params"] > 0 and summary["quant_bits"] == 4
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    card = (out / "README.md").read_text()
    assert "More Information Needed" not in card and "supervised fine-tuning" in card and summary["task"] == "sft"
    assert load_config(out / "loratune_config.yaml").model.name == str(model_dir)
    capsys.readouterr()
    assert main(["generate", *common, f"model.adapter={out}", "generate.max_new_tokens=5", "prompt=Translate: 你好"]) == 0
    assert capsys.readouterr().out.endswith("\n")  # random weights may answer only whitespace
    if arch != "llama":
        return
    prompts = tmp_path / "p.txt"
    prompts.write_text("你好\n谢谢你！\n", encoding="utf-8")
    assert main(["generate", *common, f"model.adapter={out}", "generate.max_new_tokens=4", f"generate.prompts_file={prompts}"]) == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.strip().splitlines()]
    assert [l["prompt"] for l in lines] == ["你好", "谢谢你！"]
    assert main(["evaluate", *common, f"model.adapter={out}", "eval.max_new_tokens=4", f"eval.output_dir={tmp_path / 'ev'}"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert {"chrf", "bleu"} <= set(metrics["base"]) and {"chrf", "bleu"} <= set(metrics["adapter"])
    with (tmp_path / "ev" / "examples.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == metrics["examples"] and {"reference", "base", "adapter", "chrf_adapter"} <= set(rows[0])
    # resume continues from the last checkpoint to the new step budget (the same settings otherwise:
    # a resume with another lr or warm-up is refused, naming the keys)
    assert main(["train", *common, "train.max_steps=6", "train.batch_size=4", f"train.output_dir={out}",
                 "train.eval_strategy=epoch", "train.load_best_model_at_end=false", "--resume"]) == 2
    assert "train.lr (0.01 -> 0.0001)" in capsys.readouterr().err
    assert main(["train", *common, "train.max_steps=6", "train.batch_size=4", "train.lr=1e-2", "train.warmup_epochs=0.5",
                 f"train.output_dir={out}", "train.eval_strategy=epoch", "train.load_best_model_at_end=false", "--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 6 and summary["eval_loss"] > 0


def test_packing_and_interactive_chat(tmp_path, tiny_llama, monkeypatch, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS * 3])
    common = ["task=sft", f"model.name={tiny_llama}", f"data.jsonl={data}", "train.report_to=[none]", "train.threads=1"]
    out = tmp_path / "run"
    assert main(["train", *common, "sft.packing=true", "sft.max_length=64", "train.max_steps=2", "train.batch_size=2",
                 f"train.output_dir={out}", "train.eval_strategy=epoch"]) == 0
    assert json.loads((out / "summary.json").read_text())["global_step"] == 2
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("你好\n/reset\n谢谢你！\n/quit\n"))
    capsys.readouterr()
    assert main(["generate", *common, f"model.adapter={out}", "generate.max_new_tokens=3"]) == 0
    assert len([l for l in capsys.readouterr().out.splitlines() if l.strip()]) >= 1


def test_missing_adapter_is_a_model_error(tmp_path, tiny_llama, capsys):
    assert main(["generate", "task=sft", f"model.name={tiny_llama}", f"model.adapter={tmp_path}", "prompt=hi"]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


# ---------------------------------------------------------------- the real packaged Gemma 3 270M


@pytest.mark.slow
def test_packaged_gemma_alias_caches_and_generates(tmp_path, monkeypatch):
    """First load assembles + de-quantises the GGUF into the cache; the second reads the cache fast."""
    from loratune.llm.model import load_causal_lm, load_tokenizer, packaged_gemma

    shared = os.environ.get("LORATUNE_CACHE")  # reuse a warm cache when CI has one; else build it here
    if not shared:
        monkeypatch.setenv("LORATUNE_CACHE", str(tmp_path / "cache"))
        t = time.time()
        packaged_gemma()
        first = time.time() - t
        assert first > 0
    t = time.time()
    path = packaged_gemma()
    assert time.time() - t < 2 and (path / "config.json").is_file()
    cfg = _cfg(["model.name=gemma3-270m", "generate.max_new_tokens=12"])
    t = time.time()
    tok, model = load_tokenizer(cfg), load_causal_lm(cfg)
    assert time.time() - t < 60, "cached load should take seconds"
    from loratune.generate import generate_batch

    answer = generate_batch(model, tok, ["Translate to English: 我喜欢喝茶。"], cfg, "instruction", 12)[0]
    assert "tea" in answer.lower()


def test_fsdp_qlora_keeps_one_dtype_per_layer_and_the_checkpointing_switch(tiny_llama, monkeypatch):
    """FSDP flattens each decoder layer into one tensor of one dtype: under ``accelerate launch`` with an
    FSDP config the bf16-stored 4-bit base keeps its norms in bf16 (prepare_model_for_kbit_training would
    make them fp32, which stopped the 70B recipe on an H200: RESULTS.md run 35). Outside FSDP the
    upcast stays. And SFTConfig gets checkpointing under the name this transformers knows."""
    import torch

    from loratune.core.adapters import attach_lora
    from loratune.llm.model import load_causal_lm
    from loratune.llm.train import sft_args

    overrides = ["task=sft", f"model.name={tiny_llama}", "quant.bits=4", "quant.compute_dtype=bfloat16",
                 "quant.quant_storage=bfloat16", "lora.target_modules=[q_proj,v_proj]", "train.gradient_checkpointing=true"]
    cfg = load_config(None, overrides)

    def layer_dtypes(model):
        layer = model.base_model.model.model.layers[0]
        return {p.dtype for n, p in layer.named_parameters() if "lora_" not in n}

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert layer_dtypes(attach_lora(load_causal_lm(cfg, trainable=True), cfg, "CAUSAL_LM")) == {torch.bfloat16}
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert torch.float32 in layer_dtypes(attach_lora(load_causal_lm(cfg, trainable=True), cfg, "CAUSAL_LM"))
    args = sft_args(cfg, 16)
    assert getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", None)) is True
