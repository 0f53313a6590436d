from pathlib import Path

import pytest

from loratune.cli import main
from loratune.config import RunConfig, field_docs, load_config, options_help, save_config
from loratune.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.task in ("asr", "sft")


def test_every_recipe_line_is_commented():
    for path in CONFIGS:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            stripped = line.strip()
            if stripped and not stripped.startswith("#") and not stripped.endswith(":"):
                assert "#" in line, f"{path.name}:{n} has no comment: {line!r}"


def test_overrides_and_types():
    cfg = load_config(None, ["train.epochs=2", "lora.target_modules=[q_proj,k_proj]", "quant.bits=4"])
    assert cfg.train.epochs == 2.0
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.quant.bits == 4


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["train.epoch=2"], "train.epoch"),
        (["lora.r=abc"], "lora.r"),
        (["quant.bits=3"], "quant.bits"),
        (["train.metric_for_best_model=eval_cer"], "generate_during_eval"),
        (["noequals"], "key=value"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, override)
    msg = str(info.value)
    assert fragment in msg and "\n" not in msg


def test_unknown_key_in_yaml_names_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  learning_rate: 1.0\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*learning_rate"):
        load_config(p)


def test_help_comes_from_docstrings(capsys):
    docs = field_docs(type(RunConfig().lora))
    assert "Rank" in docs["r"]
    lines = options_help()
    assert any(l.strip().startswith("lora.r (int, default 8): Rank") for l in lines)
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "data.csv" in out and "train.early_stopping_patience" in out


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=0.002"])
    path = save_config(cfg, tmp_path)
    assert load_config(path).train.lr == 0.002


def test_cli_unknown_key_exit_code(capsys):
    assert main(["train", "train.nope=1"]) == 2
    assert "train.nope" in capsys.readouterr().err
