"""Property tests: whatever a user types or writes, the override parser, the recipe loader and the CSV
reader end in success or in one LoratuneError line (the CLI prints it as `error: ...` and exits 2),
never in a traceback."""
from __future__ import annotations

import string

import pytest

hypothesis = pytest.importorskip("hypothesis")  # in the dev extra and the lock
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from loratune.cli import main as cli  # noqa: E402
from loratune.config import load_config  # noqa: E402
from loratune.errors import LoratuneError  # noqa: E402

KEYS = ["train.epochs", "train.lr", "train.batch_size", "lora.r", "lora.target_modules", "quant.bits", "data.csv",
        "whisper.language", "train.output_dir", "eval.limit", "data.rename", "train.bogus", "nope", "task", ""]
VALUES = st.one_of(st.integers(-5, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                   st.sampled_from(["", "null", "true", "[q_proj]", "[", "{a: 1}", "x y", "0.0", "-1", "1e-3", "zh", "\x00"]),
                   st.text(string.printable, max_size=12))
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _one_line(exc: LoratuneError) -> None:
    text = str(exc).strip()
    assert text and "\n" not in text, text


@SETTINGS
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.sampled_from(["=", " ", "==", ":"]), VALUES), max_size=4))
def test_overrides_succeed_or_fail_in_one_line(items):
    overrides = [f"{k}{sep}{v}" for k, sep, v in items]
    try:
        load_config(None, overrides)
    except LoratuneError as exc:
        _one_line(exc)


@SETTINGS
@given(st.text(string.printable + "：，。中文", max_size=200))
@example(text="-")  # a YAML list: was a TypeError traceback from OmegaConf's merge
@example(text="just a string")
@example(text="")
def test_any_recipe_text_loads_or_fails_in_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("r") / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except LoratuneError as exc:
        _one_line(exc)


@SETTINGS
@given(st.lists(st.lists(st.text(string.printable.replace("\r", "") + "中", max_size=8), min_size=0, max_size=4), max_size=6),
       st.sampled_from(["ID,sentence,split", "ID,sentence", "file,text", ""]))
def test_any_csv_reads_or_fails_in_one_line(tmp_path_factory, rows, header):
    import csv

    from loratune.asr.sources import load_raw_splits

    path = tmp_path_factory.mktemp("c") / "clips.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        if header:
            fh.write(header + "\n")
        csv.writer(fh).writerows(rows)
    try:
        load_raw_splits(load_config(None, [f"data.csv={path}", f"data.audio_dir={path.parent}"]).data)
    except LoratuneError as exc:
        _one_line(exc)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text(string.printable, min_size=1, max_size=10), max_size=4))
def test_cli_never_tracebacks_on_words(words):
    """Random words after `loratune merge --help`-free verbs: exit 0 (help) or 2 (one error line)."""
    code = cli(["generate", *[w for w in words if w not in ("-h", "--help", "help")], "task=nope"])
    assert code == 2
