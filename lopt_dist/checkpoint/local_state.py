"""The single-process trainer's share of a checkpoint.

Layout (one `stage_<i>/` per trained module: each LoPT stage, or the whole model for `e2e`):
    stage_<i>/model.safetensors   the module's state dict (fp32 master weights)
    stage_<i>/optimizer.pt        optimizer and schedule state: tensors and plain values only
    stage_<i>/tensors.json        what the module exports, for `lopt-export`
    rng.safetensors               the process's RNG states (CUDA too when training on a GPU)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lopt_dist.checkpoint.files import CheckpointError, open_for_write
from lopt_dist.checkpoint.rng import load_rng, save_rng
from lopt_dist.checkpoint.safe_load import load_tensors_file
from lopt_dist.checkpoint.safetensors_io import read_safetensors, write_safetensors
from lopt_dist.checkpoint.tensor_manifest import exported_tensors, write_manifest

RNG_FILE = "rng.safetensors"


def save_module_state(stage_dir: Path, module: nn.Module, optimizer, scheduler,
                      hf_name: Callable[[str], str | None]) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_safetensors(stage_dir / "model.safetensors", module.state_dict())
    with open_for_write(stage_dir / "optimizer.pt") as fh:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, fh)
    write_manifest(stage_dir, [t for t, _ in exported_tensors(module, hf_name)])


def load_module_state(stage_dir: Path, module: nn.Module, optimizer, scheduler) -> None:
    weights, _ = read_safetensors(stage_dir / "model.safetensors")
    try:
        module.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"{stage_dir / 'model.safetensors'} does not fit this model "
                              f"({str(err).splitlines()[0]}); "
                              "resume with the model and boundaries the checkpoint was made with") from None
    # Optimizer state is loaded on the CPU; load_state_dict moves each entry to its parameter's device.
    state = load_tensors_file(stage_dir / "optimizer.pt")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])


def save_process_rng(checkpoint_dir: Path, device: torch.device) -> None:
    save_rng(checkpoint_dir / RNG_FILE, device)


def load_process_rng(checkpoint_dir: Path, device: torch.device) -> None:
    load_rng(checkpoint_dir / RNG_FILE, device)
