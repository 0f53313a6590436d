"""The causal-LM wing: model loading (GGUF included), SFT data and chat templates, generation and
text evaluation (chrF/BLEU)."""
