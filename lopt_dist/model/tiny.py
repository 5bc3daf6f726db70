"""Tiny random decoder-only models of real families, for tests, smoke runs and benchmarks."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

# Differences from each family's defaults that make a model small enough for CPU tests.
_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
_FAMILY_EXTRA = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {"sliding_window": 8},
    "gemma": {"head_dim": 16},
    "phi3": {},
    "olmo2": {},
}


def tiny_config(family: str, vocab_size: int, **overrides) -> PretrainedConfig:
    if family not in _FAMILY_EXTRA:
        raise ValueError(f"unknown tiny family {family!r}; choose from {sorted(_FAMILY_EXTRA)}")
    values = {**_TINY, **_FAMILY_EXTRA[family], "vocab_size": vocab_size, "pad_token_id": 0,
              "bos_token_id": 1, "eos_token_id": 2, **overrides}
    return AutoConfig.for_model(family, **values)


def save_tiny_model(family: str, out_dir: str | Path, tokenizer=None, seed: int = 0, **overrides) -> Path:
    """A seeded random model (with `tokenizer`'s vocabulary when given) saved as a checkpoint directory."""
    vocab = len(tokenizer) if tokenizer is not None else 256
    config = tiny_config(family, vocab, **overrides)
    if tokenizer is not None:
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = tokenizer.bos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
