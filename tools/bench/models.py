"""The model every row trains: a real checkpoint, or a seeded random one of a given size saved once to disk.

Every worker loads the model from one directory, so all rows start from the very same weights (which is what
lets the report compare their first-step losses).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from lopt_dist.model.loading import build_once, cache_dir, resolve_model_path
from lopt_dist.model.tiny import tiny_config

from .config import RANDOM_PREFIX, BenchConfig, BenchConfigError

DEFAULT_RANDOM_VOCAB = 32000


@dataclass(frozen=True)
class ModelInfo:
    name: str  # as the user gave it
    path: str  # the directory every worker loads
    family: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    parameters: int
    tied_embeddings: bool


def prepare_model(cfg: BenchConfig) -> ModelInfo:
    """Resolve (or create, for random models) the checkpoint directory and describe the model."""
    if cfg.is_random_model:
        config = random_config(cfg.model[len(RANDOM_PREFIX):], cfg.model_overrides)
        path = _save_random(config, cfg.seed)
    else:
        if cfg.model_overrides:
            raise BenchConfigError("--model-set: only random models (--model random:<family>) take config changes")
        path = resolve_model_path(cfg.model)
        if Path(path).is_dir():  # workers need not share the driver's working directory
            path = Path(path).resolve()
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise BenchConfigError(f"--model: cannot load a model config from {cfg.model!r}: {err}") from None
    with torch.device("meta"):  # counts parameters without allocating them
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return ModelInfo(
        name=cfg.model, path=str(path), family=config.model_type, num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size, vocab_size=config.vocab_size, parameters=parameters,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def random_config(family: str, overrides: dict) -> PretrainedConfig:
    values = dict(overrides)
    vocab = values.pop("vocab_size", DEFAULT_RANDOM_VOCAB)
    try:
        return tiny_config(family, vocab, **values)
    except (ValueError, TypeError) as err:
        raise BenchConfigError(f"--model {RANDOM_PREFIX}{family}: {err}") from None


def _save_random(config: PretrainedConfig, seed: int) -> Path:
    # Keyed by the config and seed, so a second run (and every worker) reuses the same weights.
    key = hashlib.sha256(json.dumps([config.to_dict(), seed], sort_keys=True, default=str).encode()).hexdigest()
    target = cache_dir() / "bench-models" / f"{config.model_type}-{key[:16]}"

    def build(out_dir: Path) -> None:
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out_dir)

    return build_once(target, build)


def even_boundaries(num_layers: int, num_stages: int) -> list[int]:
    """Layer indices where stages 1.. start, splitting the layers as evenly as whole layers allow."""
    return [round(num_layers * i / num_stages) for i in range(1, num_stages)]


def stage_problem(num_layers: int, num_stages: int) -> str | None:
    """Why `num_layers` cannot be cut into `num_stages` non-empty stages, or None."""
    if num_layers < num_stages:
        return f"the model has {num_layers} layers, too few for {num_stages} stages of at least one layer"
    return None
