"""Build one stage of a checkpoint, materialising its tensors and no others.

The whole model is first built as a skeleton whose parameters live on the meta device (no memory), while its
buffers are real: non-persistent buffers such as rotary `inv_freq` are computed by the family's own
constructor, exactly as `from_pretrained` computes them. `split_model(..., only=index)` cuts the skeleton;
then the stage is materialised one unit at a time (embedding, each decoder layer, final norm, LM head,
reconstruction decoder): each unit's tensors are read from the checkpoint's safetensors in the run's dtype,
straight onto the worker's device, and the unit is handed to `partition` (ZeRO-3 shards it at once) before
the next one is read. Nothing outside the stage is ever read or allocated. Where transformers stores a family
under other names or layouts than it has in memory (MoE experts one matrix per expert on disk, fused in
memory), the `KeyPlan` made from the checkpoint's names says which keys make each tensor, and transformers'
own conversion combines them (key_plan.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lopt_dist.config import ConfigError, ExperimentConfig
from lopt_dist.model.key_plan import KeyPlan
from lopt_dist.model.lora import apply_model_lora
from lopt_dist.model.stages import Stage, split_model
from lopt_dist.model.weights import WeightFiles
from lopt_dist.telemetry.memory import current_rss_bytes, peak_rss_bytes
from lopt_dist.train.precision import run_dtype


@dataclass
class LoadReport:
    """What loading a stage read and built; the stage worker keeps it for tests and benchmarks."""

    tensors_read: list[str]  # checkpoint names, in reading order
    files_opened: list[str]
    bytes_read: int
    parameters: int  # elements of the stage's parameters, decoder included (all ranks together)
    parameter_bytes: int
    rss_after_load: int  # host RSS of this process once the stage is loaded
    peak_rss_after_load: int  # its high-water mark then (since start, or since the last `reset_peak`)


def load_stage(
    cfg: ExperimentConfig,
    stage_index: int,
    device: torch.device,
    partition: Callable[[nn.Module], None] | None = None,
) -> tuple[Stage, LoadReport]:
    """Stage `stage_index` of `cfg.model.name`, in `train.dtype` on `device`, in training mode."""
    dtype = run_dtype(cfg.train)
    files = WeightFiles(cfg.model.name)
    try:
        skeleton = empty_model(AutoConfig.from_pretrained(files.location), dtype, cfg.model.attn_implementation)
        plan = KeyPlan(skeleton, files.weight_map, files.location)  # before any weight is read
        with init_empty_weights(include_buffers=False):  # the untied head and the decoder start empty too
            [stage] = split_model(skeleton, cfg.model.boundaries, cfg.train.lambda_aux, cfg.train.seed,
                                  only=stage_index, decoder_init=cfg.train.decoder_init, packed=cfg.data.packing)
        materialise(stage, plan, files, dtype, device, partition)
        # LoRA wraps the materialised layers (model.lora); under ZeRO-3 DeepSpeed partitions the small adapters
        # when the engine is built.
        apply_model_lora(stage, cfg.model, cfg.train.seed, stage_index)
    finally:
        files.close()
    stage.train()
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in stage.parameters())
    report = LoadReport(list(files.tensors_read), list(files.files_opened), files.bytes_read, numel,
                        numel * torch.finfo(dtype).bits // 8, current_rss_bytes(), peak_rss_bytes())
    return stage, report


def empty_model(config: PretrainedConfig, dtype: torch.dtype, attn_implementation: str) -> PreTrainedModel:
    """The model with parameters on the meta device and real buffers."""
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model


def materialise(
    stage: Stage,
    plan: KeyPlan,
    files: WeightFiles,
    dtype: torch.dtype,
    device: torch.device,
    partition: Callable[[nn.Module], None] | None = None,
) -> None:
    """Fill the stage's parameters unit by unit from `files` as `plan` says (the decoder from its seed), on
    `device`."""
    for buffer_owner, name, buffer in _buffers(stage):
        buffer_owner._buffers[name] = buffer.to(device)  # dtype kept: rotary tables stay float32
    for unit, prefix in stage_units(stage):
        if prefix is None:  # the reconstruction decoder: seeded, not in the checkpoint
            unit.to_empty(device=device)
            unit.reset_parameters()
            unit.to(dtype)
        else:
            _fill(unit, prefix, plan, files, dtype, device)
        if partition is not None:
            partition(unit)


def _fill(unit: nn.Module, prefix: str, plan: KeyPlan, files: WeightFiles, dtype: torch.dtype,
          device: torch.device) -> None:
    made: dict[str, torch.Tensor] = {}  # tensors a conversion made for parameters of this unit not yet filled
    for name, param in list(unit.named_parameters()):
        owner, leaf = _owner(unit, name)
        tensor = _take(f"{prefix}.{name}", made, plan, files, dtype, device)
        if tensor.shape != param.shape:
            raise ConfigError(f"model.name: {files.location}: tensor {prefix}.{name} has shape {list(tensor.shape)} "
                              f"in the checkpoint, the model's config.json makes it {list(param.shape)}; the "
                              "checkpoint does not match its config.json (re-save it with save_pretrained)")
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=param.requires_grad)
    # Persistent buffers the checkpoint holds (rare in these families) replace the constructed ones.
    for name, buffer in list(unit.named_buffers()):
        owner, leaf = _owner(unit, name)
        if leaf not in owner._non_persistent_buffers_set and plan.has(f"{prefix}.{name}"):
            owner._buffers[leaf] = _take(f"{prefix}.{name}", made, plan, files, buffer.dtype, device)


def _take(name: str, made: dict[str, torch.Tensor], plan: KeyPlan, files: WeightFiles, dtype: torch.dtype,
          device: torch.device) -> torch.Tensor:
    """Model tensor `name`: made earlier with another tensor of its unit, or read (and converted) now. The plan
    guarantees that one conversion makes tensors of one unit only, so `made` is empty once a unit is filled."""
    if name in made:
        return made.pop(name)
    source, output = plan.source(name)
    tensors = plan.make(source, lambda key: files.read(key, dtype, device))
    taken = tensors.pop(output)
    made.update(tensors)
    return taken


def stage_units(stage: Stage) -> Iterator[tuple[nn.Module, str | None]]:
    """The stage's modules with their name prefixes in the full model (None: the decoder), in the order of the
    stage's own parameters: ZeRO-3 numbers parameters as they are partitioned and lays them out by number."""
    embed_name, layers_name, norm_name, head_name = stage.names
    for offset, layer in enumerate(stage.layers):
        yield layer, f"{layers_name}.{stage.layer_range[0] + offset}"
    if stage.embed is not None:
        yield stage.embed, embed_name
    if stage.norm is not None:
        yield stage.norm, norm_name
    if stage.head is not None:
        yield stage.head, head_name
    if stage.decoder is not None:
        yield stage.decoder, None


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _buffers(module: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor]]:
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None:
                yield owner, name, buffer
