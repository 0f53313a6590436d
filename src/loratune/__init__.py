"""loratune: QLoRA / LoRA fine-tuning of Whisper and causal LLMs (see README.md)."""

__version__ = "0.1.0"
