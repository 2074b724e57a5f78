"""Tiny random HF models for kernel and training tests (seconds on CPU)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch


def tiny_config(model_type: str = "llama", vocab: int = 320, **kw):
    from transformers import AutoConfig

    base = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, head_dim=16)
    base.update(kw)
    return AutoConfig.for_model(model_type, **base)


def tiny_model(model_type: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **kw), dtype=torch.float32).eval()


def save_tiny_with_tokenizer(out: Path, tokenizer_from: Path, seed: int = 0, **kw) -> Path:
    """A tiny random Llama checkpoint that shares a real tokenizer (and so its vocabulary size)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    model = tiny_model(seed=seed, vocab=len(tok), **kw)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    for f in ("chat_template.jinja",):
        if (tokenizer_from / f).exists():
            shutil.copy(tokenizer_from / f, out / f)
    return out
