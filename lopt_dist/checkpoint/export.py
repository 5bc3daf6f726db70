"""The final Hugging Face model: each stage writes its own shards, then one small step joins them.

Stage writers (Ray workers, the single-process trainer, `lopt-export`) stream their tensors into
`stageNN-KKKKK.safetensors` files of at most `checkpoint.export_shard_size` bytes inside a temporary directory
beside the target. `finalize_export` then checks the shards against the model's expected tensors (names and
shapes, read from the shard headers on disk), renames them to the standard `model-0000i-of-0000N.safetensors`
(or `model.safetensors` when one shard suffices), writes `model.safetensors.index.json`, the config
(`tie_word_embeddings: false`, the export dtype), the generation config and the tokenizer. The temporary
directory replaces the target in one rename. No step holds more than one tensor of the model.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from lopt_dist.atomic import atomic_directory
from lopt_dist.checkpoint.files import os_errors_named, write_text
from lopt_dist.checkpoint.safetensors_io import Shard, ShardedWriter, TensorSpec
from lopt_dist.checkpoint.tensor_manifest import ExportedTensor

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 10**9


@dataclass
class ModelFiles:
    """The small files of the base model that the export carries over."""

    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase | None
    generation_config: GenerationConfig | None = None

    @classmethod
    def of(cls, model_name: str) -> ModelFiles:
        from lopt_dist.model.loading import load_model_config, load_tokenizer, resolve_model_path

        config = load_model_config(model_name)
        try:
            generation = GenerationConfig.from_pretrained(resolve_model_path(model_name))
        except (OSError, ValueError):  # the base model has none: derive it from the config
            generation = GenerationConfig.from_model_config(config)
        return cls(config, load_tokenizer(model_name), generation)


def export_dtype(cfg) -> torch.dtype:
    """`checkpoint.export_dtype`, where 'auto' means the training dtype."""
    name = cfg.train.dtype if cfg.checkpoint.export_dtype == "auto" else cfg.checkpoint.export_dtype
    return getattr(torch, name)


def stage_prefix(stage_index: int) -> str:
    return f"stage{stage_index:02d}"


def write_stage(directory: Path, stage_index: int, entries: list[ExportedTensor],
                read: Callable[[ExportedTensor], torch.Tensor], max_bytes: int, dtype: torch.dtype) -> list[Shard]:
    """Stream one stage's tensors, fetched one at a time by `read`, into shards."""
    writer = ShardedWriter(directory, stage_prefix(stage_index), [e.spec(dtype) for e in entries], max_bytes)
    for entry in entries:
        tensor = read(entry)
        writer.write(entry.name, tensor.to(dtype=entry.spec(dtype).dtype))
        del tensor
    return writer.close()


def finalize_export(directory: Path, shards: list[Shard], files: ModelFiles, dtype: torch.dtype) -> None:
    """Turn the stage shards in `directory` into a Hugging Face model directory (in place)."""
    config = copy.deepcopy(files.config)
    config.tie_word_embeddings = False  # LoPT trained the embedding and the head apart
    config.dtype = dtype
    _check_coverage(directory, shards, config)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    with os_errors_named(directory):
        for shard, name in zip(shards, names):
            (directory / shard.file).rename(directory / name)
            weight_map.update({tensor: name for tensor in shard.names})
        index = {"metadata": {"total_size": sum(s.nbytes for s in shards)},
                 "weight_map": dict(sorted(weight_map.items()))}
        write_text(directory / INDEX_FILE, json.dumps(index, indent=2))
        config.save_pretrained(directory)
        if files.generation_config is not None:
            files.generation_config.save_pretrained(directory)
        if files.tokenizer is not None:
            files.tokenizer.save_pretrained(directory)


def _check_coverage(directory: Path, shards: list[Shard], config: PretrainedConfig) -> None:
    """The shards on disk hold exactly the model's tensors, each with its shape (read from the shard headers)."""
    from safetensors import safe_open

    with torch.device("meta"):  # a skeleton: names and shapes, no memory
        expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    written: dict[str, tuple[int, ...]] = {}
    for shard in shards:
        with safe_open(str(directory / shard.file), framework="pt") as f:
            for name in f.keys():
                if name in written:
                    raise ValueError(f"stage weights overlap: {name} was written twice")
                written[name] = tuple(f.get_slice(name).get_shape())
    missing, extra = sorted(set(expected) - set(written)), sorted(set(written) - set(expected))
    wrong = sorted(k for k in set(expected) & set(written) if expected[k] != written[k])
    if missing or extra or wrong:
        raise ValueError(f"stage weights do not cover the model: missing {missing[:5]}, unexpected {extra[:5]}, "
                         f"wrong shape {[(k, written[k], expected[k]) for k in wrong[:5]]}")


def export_to(target: Path, write_shards: Callable[[Path], list[Shard]], files: ModelFiles,
              dtype: torch.dtype) -> Path:
    """`write_shards(directory)` has every stage write its shards (returning their metadata); this joins them
    into `target`, which appears complete or not at all."""
    target = Path(target)
    with atomic_directory(target) as tmp:
        finalize_export(tmp, write_shards(tmp), files, dtype)
    return target


def export_model(stage_weights: Iterable[dict[str, torch.Tensor]], config: PretrainedConfig,
                 tokenizer: PreTrainedTokenizerBase | None, out_dir: str | Path, dtype: torch.dtype = torch.float32,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, generation_config: GenerationConfig | None = None) -> Path:
    """In-process export of stage weights given as dicts under the full model's names (any order of stages)."""
    return export_to(Path(out_dir), lambda directory: write_weights(directory, stage_weights, max_shard_bytes, dtype),
                     ModelFiles(config, tokenizer, generation_config), dtype)


def write_weights(directory: Path, stage_weights: Iterable[dict[str, torch.Tensor]], max_bytes: int,
                  dtype: torch.dtype) -> list[Shard]:
    """Shards of in-memory stage weights (the single-process trainer's), stage after stage."""
    shards: list[Shard] = []
    for i, weights in enumerate(stage_weights):
        entries = [ExportedTensor(k, k, tuple(v.shape), v.dtype) for k, v in weights.items()]
        shards += write_stage(directory, i, entries, lambda e, w=weights: w[e.key], max_bytes, dtype)
    return shards


__all__ = ["DEFAULT_SHARD_BYTES", "INDEX_FILE", "ModelFiles", "Shard", "TensorSpec", "export_dtype",
           "export_model", "export_to", "finalize_export", "stage_prefix", "write_stage", "write_weights"]
