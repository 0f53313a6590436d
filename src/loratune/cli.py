"""The ``loratune`` command: one subcommand per verb, one option style everywhere.

    loratune VERB [RECIPE.yaml] [key=value ...] [PATHS ...] [--resume] [--gpus N] [--verbose]

``--verbose`` shows the library notices that ``console.quiet_libraries`` hides.
``key=value`` sets any field of :class:`loratune.config.RunConfig` (``loratune VERB --help``
lists them all with their help text). Positional paths are the verb's inputs (audio files for
``transcribe``, a checkpoint for ``convert``). Verbs are imported lazily, so ``--help`` is fast
and importing loratune has no side effects.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import List, Optional

from loratune.console import quiet_libraries, verbose_requested
from loratune.errors import LoratuneError

# verb -> (module, one-line description)
VERBS = {
    "train": ("loratune.train", "fine-tune a LoRA/QLoRA adapter (Whisper ASR or causal-LM SFT)"),
    "evaluate": ("loratune.evaluate", "score a base model and/or an adapter on a test set (CER/WER, chrF/BLEU)"),
    "transcribe": ("loratune.transcribe", "transcribe audio files or folders to txt/srt/vtt/json"),
    "generate": ("loratune.generate", "generate text with a causal LM (+ adapter): one prompt, a file, or chat"),
    "merge": ("loratune.merge", "merge an adapter into a de-quantised base -> standalone model"),
    "export": ("loratune.export", "export a merged Whisper model to CTranslate2 / faster-whisper"),
    "convert": ("loratune.convert", "convert a CTranslate2 Whisper checkpoint to a Hugging Face directory"),
    "serve": ("loratune.serve", "HTTP transcription service with a small web page"),
}

USAGE = """usage: loratune VERB [RECIPE.yaml] [key=value ...] [PATHS ...] [--resume] [--gpus N] [--verbose]

verbs:
{verbs}

`loratune VERB --help` lists every key=value option with its help text.
--verbose also shows the library notices loratune hides (see loratune/console.py).
"""


# verbs that take positional paths (audio inputs; a checkpoint and output; a model; an output
# folder); every other verb takes none, so a stray word there is a typo
PATH_VERBS = {"transcribe", "convert", "export", "merge"}


def _gpus(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise LoratuneError(f"--gpus {value!r}: give a whole number of processes, e.g. --gpus 2")
    return int(value)


class Invocation:
    """What the command line asked for, split into recipe, overrides, paths and flags."""

    def __init__(self, verb: str, argv: List[str]):
        self.verb = verb
        self.recipe: Optional[str] = None
        self.overrides: List[str] = []
        self.paths: List[str] = []
        self.flags: dict = {}
        it = iter(argv)
        for tok in it:
            if tok in ("--resume",):
                self.overrides.append("train.resume=true")
            elif tok == "--gpus":
                self.flags["gpus"] = _gpus(next(it, ""))
            elif tok.startswith("--gpus="):
                self.flags["gpus"] = _gpus(tok.split("=", 1)[1])
            elif tok.startswith("--"):
                raise LoratuneError(f"unknown flag {tok}; options are key=value (see `loratune {verb} --help`)")
            elif "=" in tok and not tok.startswith(("/", ".")):
                self.overrides.append(tok)
            elif tok.endswith((".yaml", ".yml")) and self.recipe is None and not self.paths:
                self.recipe = tok
            else:
                self.paths.append(tok)
        if self.paths and verb not in PATH_VERBS:
            hint = " (no spaces around '=': key=value)" if any(" " in p or "." in p.split("/")[-1] for p in self.paths) else ""
            raise LoratuneError(f"loratune {verb} takes no positional arguments, got {' '.join(map(repr, self.paths))}{hint}; "
                                f"options are key=value (see `loratune {verb} --help`)")

    def config(self):
        from loratune.config import load_config

        return load_config(self.recipe, self.overrides)


def _print_help(verb: Optional[str]) -> None:
    if verb is None:
        width = max(map(len, VERBS))
        print(USAGE.format(verbs="\n".join(f"  {v:<{width}}  {d}" for v, (_, d) in VERBS.items())))
        return
    from loratune.config import options_help, plain_text

    module = importlib.import_module(VERBS[verb][0])
    print(plain_text((module.__doc__ or "").strip()))
    print("\noptions (key=value; YAML recipe keys are the same; every other section is accepted too):")
    print("\n".join(options_help(sections=getattr(module, "SECTIONS", None))))


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--verbose" in argv:
        argv.remove("--verbose")
        os.environ["LORATUNE_VERBOSE"] = "1"  # torchrun workers inherit it
    verbose = verbose_requested()
    # loratune's own progress at INFO; libraries' INFO chatter (matplotlib's font cache, ...) only
    # with --verbose, their warnings always (minus the few console.quiet_libraries names)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("loratune").setLevel(logging.INFO)
    if not verbose:
        quiet_libraries()
    if not argv or argv[0] in ("-h", "--help", "help"):
        _print_help(None)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb {verb!r}; choose one of {', '.join(VERBS)}", file=sys.stderr)
        return 2
    if "-h" in rest or "--help" in rest:
        _print_help(verb)
        return 0
    try:
        inv = Invocation(verb, rest)
        module = importlib.import_module(VERBS[verb][0])
        result = module.main(inv)
        return int(result or 0)
    except LoratuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
