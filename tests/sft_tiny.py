"""Tiny causal LMs for offline SFT tests: random weights, a small BPE tokenizer trained on the spot."""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = [
    "### Instruction:\nTranslate to English: 我喜欢喝茶。\n\n### Response:\nI like to drink tea.",
    "Hello, teacher! Nice to meet you. Thank you! You're welcome. Sorry. It's okay.",
    "老师，您好！你好，很高兴认识你。谢谢你！不客气。对不起。没关系。",
    "The force is strong with you. Strong with the force, you are. Yoda speaks like this, hmm.",
    "system user assistant Answer the question briefly.",
]


def make_tokenizer(chat_template: bool = True):
    """A ~600-token byte-level BPE fast tokenizer with BOS/EOS/PAD and an optional chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_llama(out_dir: str | Path, chat_template: bool = True, arch: str = "llama", seed: int = 0) -> Path:
    """Save a tiny random Llama (or Phi-3 / Gemma 3 text) causal LM + tokenizer to ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer(chat_template)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "llama":
        from transformers import LlamaConfig as Config
    elif arch == "phi3":
        from transformers import Phi3Config as Config
    elif arch == "gemma3":
        from transformers import Gemma3TextConfig as Config

        common.update(head_dim=16, sliding_window=64)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Config(**common))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
