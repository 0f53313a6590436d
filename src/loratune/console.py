"""A console a person can read: library notices that are not the user's business stay hidden.

``quiet_libraries()`` is called by the ``loratune`` command (never at import). Each entry below
names one message and the module that emits it, so nothing else is hidden: a new warning from
any library still shows. ``loratune VERB ... --verbose`` (or ``LORATUNE_VERBOSE=1``, which
torchrun workers inherit) shows them all again.

Why each one is hidden rather than fixed:
- transformers ``is_gradient_checkpointing`` FutureWarning: raised inside PEFT/transformers'
  own calls (PEFT's k-bit preparation, the Trainer), no loratune code calls it.
- torch ``torch.jit.script_method`` DeprecationWarning: raised while importing a library module
  that defines TorchScript methods; nothing loratune runs.
- transformers "Passing `generation_config` together with generation-related arguments":
  Whisper's own ``generate`` passes ``suppress_tokens`` beside the config it built itself.
- bitsandbytes "Failed to load CPU gemm_4bit_forward from kernels-community": an optional Hub
  kernel for AVX512-BF16 CPUs that this offline install does not have; loratune keeps 4-bit
  weights in the training layout anyway (``models.adapters.keep_4bit_layout``).
"""
from __future__ import annotations

import logging
import os
import warnings

# (warnings category, message regex, module regex) for the warnings module
_WARNINGS = [
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated", r"transformers\.modeling_utils"),
    (DeprecationWarning, r"`torch\.jit\.script_method` is deprecated", r"torch\.jit\._script"),
]
# (logger name, start of the message) for library loggers
_LOG_RECORDS = [
    ("transformers.generation.utils", "Passing `generation_config` together with generation-related arguments=({'suppress_tokens', 'begin_suppress_tokens'})"),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
]


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def verbose_requested() -> bool:
    return os.environ.get("LORATUNE_VERBOSE", "").lower() in ("1", "true", "yes")


def quiet_libraries() -> None:
    """Hide exactly the notices listed above (idempotent)."""
    for category, message, module in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefix in _LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_DropMessage(prefix))
