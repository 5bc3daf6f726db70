"""A stage worker's share of a checkpoint and of the final export, on top of its DeepSpeed engine.

Layout of `stage_<i>/` (written by the stage's workers together):
    state/                  DeepSpeed's own files (tag "state"): model states, ZeRO optimizer partitions
    rng_rank<r>.safetensors each worker's RNG states (Python, torch CPU, CUDA on GPU workers)
    tensors.json            what the stage exports, for `lopt-export` (rank 0)

Every function here is collective over the stage's group: all its workers call it, in the same order.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lopt_dist.checkpoint.export import write_stage
from lopt_dist.checkpoint.files import CheckpointError, os_errors_named
from lopt_dist.checkpoint.rng import load_rng, save_rng
from lopt_dist.checkpoint.safe_load import install_safe_checkpoint_engine
from lopt_dist.checkpoint.safetensors_io import Shard
from lopt_dist.checkpoint.tensor_manifest import ExportedTensor, exported_tensors, merged_reader, write_manifest

TAG = "state"


def save_stage(engine, stage_dir: Path, rank: int, device: torch.device) -> None:
    """Every file is fsynced by the process that writes it (the safe engine saves DeepSpeed's files that way),
    so it is on disk, not in this node's cache, before the driver commits; the driver syncs the directories."""
    install_safe_checkpoint_engine(engine)
    with os_errors_named(stage_dir):
        engine.save_checkpoint(str(stage_dir), tag=TAG)
        save_rng(stage_dir / f"rng_rank{rank}.safetensors", device)
        if rank == 0:
            stage = engine.module
            tensors = [t for t, _ in exported_tensors(stage, stage.hf_name)]
            write_manifest(stage_dir, tensors, {"fp32_master_order": _master_order(engine)})


def load_stage(engine, stage_dir: Path, rank: int, device: torch.device) -> None:
    if not (stage_dir / TAG).is_dir():
        raise CheckpointError(f"{stage_dir / TAG} is missing; the checkpoint is incomplete: resume from another one")
    install_safe_checkpoint_engine(engine)
    try:
        loaded, _ = engine.load_checkpoint(str(stage_dir), tag=TAG)
    except CheckpointError:
        raise
    except Exception as err:  # DeepSpeed's asserts and KeyErrors say little; name the checkpoint
        raise CheckpointError(f"{stage_dir}: DeepSpeed cannot load this stage's state ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'no message'}); resume from another "
                              "checkpoint, with the group sizes and ZeRO stage it was written with") from err
    if loaded is None:
        raise CheckpointError(f"{stage_dir / TAG} holds no DeepSpeed checkpoint for this worker; "
                              "resume from another one")
    load_rng(stage_dir / f"rng_rank{rank}.safetensors", device)


class _Masters:
    """The fp32 master value of each stage parameter, whatever DeepSpeed wrapper holds it.

    - ZeRO 1-2 and BF16_Optimizer map each parameter to a fragment of their fp32 partition, ZeRO-3 to its fp32
      shard: `safe_get_full_fp32_param` assembles it (an all-reduce / all-gather over the group);
    - ZeRO-0 in fp32 has no wrapper: the parameter is the master;
    - ZeRO-0 in bf16 wraps the optimizer in FP16_UnfusedOptimizer, whose `fp32_groups` mirror `fp16_groups`
      (measured on DeepSpeed 0.19.8; `safe_get_full_fp32_param` returns None there);
    - a frozen parameter (a LoRA stage's base weights) has no master: its value is the one it trained with.
    A low-precision trainable parameter whose master cannot be found is an error, never a silent bf16 export.
    """

    def __init__(self, engine) -> None:
        self._unfused = {}
        optimizer = engine.optimizer
        if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups"):
            for lows, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups):
                self._unfused.update({id(low): master for low, master in zip(lows, masters)})

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        from deepspeed.utils import safe_get_full_fp32_param

        if not isinstance(tensor, nn.Parameter):
            return tensor.detach()  # a buffer: not partitioned, no master
        if not tensor.requires_grad:
            return _gathered(tensor) if hasattr(tensor, "ds_id") else tensor.detach()
        full = safe_get_full_fp32_param(tensor)
        if full is not None:
            return full
        if id(tensor) in self._unfused:
            return self._unfused[id(tensor)].detach()
        if hasattr(tensor, "ds_id"):  # a ZeRO-3 parameter the optimizer does not own: its gathered value is all
            return _gathered(tensor)
        if tensor.dtype != torch.float32:
            raise RuntimeError(f"{name}: no fp32 master weight found for this {tensor.dtype} parameter")
        return tensor.detach()


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    import deepspeed

    with deepspeed.zero.GatheredParameters([tensor]):
        return tensor.detach().float().clone()


def _master_order(engine) -> list[list[str]] | None:
    """For ZeRO-0 in bf16: the stage keys in the order of the wrapper's fp32 groups (lopt-export reads them so)."""
    optimizer = engine.optimizer
    if not (hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "fp32_groups")):
        return None
    key_of = {id(p): key for key, p in engine.module.named_parameters()}
    return [[key_of[id(p)] for p in group] for group in optimizer.fp16_groups]


def export_stage(engine, directory: Path, stage_index: int, is_writer: bool, max_bytes: int,
                 dtype: torch.dtype) -> list[Shard] | None:
    """Write this stage's exported tensors as safetensors shards into `directory` (on the writer rank).

    Tensors are assembled one at a time (under ZeRO-3 one parameter's gather, never the whole stage), cast to
    `dtype` and streamed into the current shard. Returns the shards' metadata on the writer, None elsewhere.
    """
    stage = engine.module
    live = exported_tensors(stage, stage.hf_name)
    masters = _Masters(engine)
    tensors = dict(stage.state_dict(keep_vars=True))  # LoRA adapters too, which merged_reader reads

    def read_stored(entry: ExportedTensor) -> torch.Tensor:
        return masters(entry.name, tensors[entry.key])  # collective: every rank takes part

    read = merged_reader(read_stored)

    entries = [entry for entry, _ in live]
    if is_writer:
        return write_stage(directory, stage_index, entries, read, max_bytes, dtype)
    for entry in entries:
        read(entry)
    return None


def stage_weights(engine, is_writer: bool) -> dict[str, torch.Tensor] | None:
    """The stage's fp32 master weights under the full model's names, on the writer rank only (collective)."""
    stage = engine.module
    masters = _Masters(engine)
    tensors = dict(stage.state_dict(keep_vars=True))
    read = merged_reader(lambda entry: masters(entry.name, tensors[entry.key]))
    out = {}
    for entry, _ in exported_tensors(stage, stage.hf_name):
        value = read(entry)
        if is_writer:
            out[entry.name] = value.detach().to("cpu", copy=True)
    return out if is_writer else None
