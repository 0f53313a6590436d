"""The Whisper wing: data sources and log-mel features, the collator, short-clip trimming, model
loading, the transcriber, CER/WER evaluation, and CTranslate2 import/export of packaged weights."""
