"""User-facing errors: one line that names the file/row/key and the fix.

The CLI prints ``error: <message>`` and exits with status 2 for these; anything else is a bug
and keeps its traceback.
"""


class LoratuneError(Exception):
    """An input problem the user can fix; the message is a single actionable line."""


class ConfigError(LoratuneError):
    """Unknown key, wrong type or inconsistent values in a recipe or override."""


class DataError(LoratuneError):
    """A data row, file or column that cannot be used."""


class ModelError(LoratuneError):
    """A model, adapter or checkpoint that cannot be loaded as asked."""
