"""Rejoin trained stages (decoders dropped) into an ordinary Hugging Face checkpoint directory."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from lopt_dist.atomic import atomic_directory


def export_model(
    stage_weights: list[dict[str, torch.Tensor]],
    config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | Path,
) -> Path:
    """Write float32 safetensors + config (`tie_word_embeddings: false`) + tokenizer that `from_pretrained` loads.

    `stage_weights` are the stages' `hf_state_dict()`s, in any order; together they must cover the model.
    """
    config = copy.deepcopy(config)
    config.tie_word_embeddings = False  # LoPT trained the embedding and the head apart
    merged: dict[str, torch.Tensor] = {}
    for weights in stage_weights:
        merged.update({k: v.detach().cpu().float() for k, v in weights.items()})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = set(model.state_dict())
    missing, extra = expected - set(merged), set(merged) - expected
    if missing or extra:
        raise ValueError(
            f"stage weights do not cover the model: missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    model.load_state_dict(merged, strict=True)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out_dir
