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
    "gemma2": {"head_dim": 16, "sliding_window": 4},  # soft-capped logits and attention; local/global layers
    "phi3": {},
    "olmo2": {},
    # Granite-3's own multipliers, so a split that ignores them cannot pass.
    "granite": {"embedding_multiplier": 12.0, "logits_scaling": 8.0, "residual_multiplier": 0.22,
                "attention_multiplier": 0.0078125},
    "cohere": {"logit_scale": 0.0625},
    "cohere2": {"logit_scale": 0.0625, "sliding_window": 4},  # sliding, sliding, sliding, full
    # Local (sliding, its own rope base) and global layers in every stage; a window shorter than the sequences.
    "gemma3_text": {"head_dim": 16, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"] * 2},
    # Chunked attention in chunks shorter than the sequences; layer 3 is global without rope; MoE in every layer.
    "llama4_text": {"head_dim": 16, "intermediate_size_mlp": 128, "num_local_experts": 4, "attention_chunk_size": 4},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"embedding_multiplier": 12.0, "logits_scaling": 8.0, "residual_multiplier": 0.22,
                   "attention_multiplier": 0.0078125, "num_local_experts": 4, "num_experts_per_tok": 2},
    # Linear-attention (gated delta net) layers beside full attention, and MoE.
    "qwen3_next": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                   "shared_expert_intermediate_size": 64, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                   "linear_key_head_dim": 16, "linear_value_head_dim": 16},
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
