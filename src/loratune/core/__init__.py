"""Shared machinery under both wings: quantisation and LoRA glue, model-name resolution and the
cache root, model loading for inference, metrics, the training skeleton, reporting, speed switches
and atomic writes. Nothing here knows whether the model hears or reads."""
