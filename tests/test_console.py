"""The quiet console: exactly the listed library notices are hidden, and --verbose shows them."""
from __future__ import annotations

import logging
import warnings

from loratune.console import quiet_libraries


def _emit():
    seen = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: seen.append(r.getMessage())
    names = ["transformers.generation.utils", "bitsandbytes.backends.cpu.ops"]
    for n in names:
        logging.getLogger(n).addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            quiet_libraries()
            warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning,
                                   "modeling_utils.py", 3312, module="transformers.modeling_utils")
            warnings.warn_explicit("something else is deprecated", FutureWarning, "modeling_utils.py", 1,
                                   module="transformers.modeling_utils")
            warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "mine.py", 1, module="mypkg.mine")
        gen = logging.getLogger(names[0])
        gen.warning("Passing `generation_config` together with generation-related arguments=({'suppress_tokens', "
                    "'begin_suppress_tokens'}) is deprecated")
        gen.warning("Passing `generation_config` together with generation-related arguments=({'num_beams'}) is deprecated")
        logging.getLogger(names[1]).warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s", "x")
        logging.getLogger(names[1]).warning("another bitsandbytes warning")
    finally:
        for n in names:
            logging.getLogger(n).removeHandler(handler)
    return [str(w.message) for w in caught], seen


def test_only_the_listed_notices_are_hidden():
    shown_warnings, shown_logs = _emit()
    assert shown_warnings == ["something else is deprecated", "`is_gradient_checkpointing` is deprecated"]
    assert shown_logs == ["Passing `generation_config` together with generation-related arguments=({'num_beams'}) is deprecated",
                          "another bitsandbytes warning"]


def test_verbose_flag_skips_the_filters(monkeypatch):
    from loratune import cli

    called = []
    monkeypatch.setattr(cli, "quiet_libraries", lambda: called.append(1))
    monkeypatch.delenv("LORATUNE_VERBOSE", raising=False)
    assert cli.main(["train", "--help"]) == 0 and called == [1]
    monkeypatch.setenv("LORATUNE_VERBOSE", "")
    assert cli.main(["train", "--help", "--verbose"]) == 0 and called == [1]
    import os

    assert os.environ["LORATUNE_VERBOSE"] == "1"  # torchrun workers inherit it
