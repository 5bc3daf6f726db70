"""Random-number-generator states: Python's, torch's CPU generator and, on a GPU, the CUDA generator of the
device in use. Stored as a safetensors file (byte tensors, Python's state as JSON metadata): nothing to unpickle.

Restoring always hands torch CPU byte tensors, which is what `torch.set_rng_state` and
`torch.cuda.set_rng_state` take whatever device the trainer runs on.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from lopt_dist.checkpoint.safetensors_io import read_safetensors, write_safetensors


def save_rng(path: Path, device: torch.device) -> None:
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    version, internal, gauss = random.getstate()
    metadata = {"python": json.dumps([version, list(internal), gauss]), "device": device.type}
    write_safetensors(path, tensors, metadata)


def load_rng(path: Path, device: torch.device) -> None:
    tensors, metadata = read_safetensors(path)
    version, internal, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(tensors["torch"].cpu())
    if device.type == "cuda":
        if "cuda" not in tensors:
            # A checkpoint made on CPU resumed on a GPU: the CUDA stream starts from the seed, as in a new run.
            return
        torch.cuda.set_rng_state(tensors["cuda"].cpu(), device)
