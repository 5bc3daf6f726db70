"""`tensors.json`: what a stage exports, written beside its training state.

For each tensor the export keeps: its name in the full model, its key in the stage's state dict, shape and dtype.
With it, `lopt-export` plans the shards and maps names without building the model, and the run's own export
plans its shards before any tensor is gathered.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lopt_dist.checkpoint.files import CheckpointError, write_text
from lopt_dist.checkpoint.safetensors_io import TensorSpec

if TYPE_CHECKING:
    from lopt_dist.model.lora import LoraDelta

MANIFEST = "tensors.json"


@dataclass(frozen=True)
class ExportedTensor:
    name: str  # in the full Hugging Face model
    key: str  # in the stage's (or e2e model's) state dict
    shape: tuple[int, ...]
    dtype: torch.dtype  # as trained (the fp32 master's dtype for parameters)
    lora: LoraDelta | None = None  # a LoRA base weight: the export adds its adapters' product (`merged_reader`)

    def spec(self, export_dtype: torch.dtype) -> TensorSpec:
        # Floating tensors take the export dtype; integer buffers keep theirs.
        return TensorSpec(self.name, self.shape, export_dtype if self.dtype.is_floating_point else self.dtype)


def exported_tensors(module: nn.Module,
                     hf_name: Callable[[str], str | None]) -> list[tuple[ExportedTensor, torch.Tensor]]:
    """(description, live tensor) for each exported entry of `module`'s state dict, in state-dict order.

    `keep_vars=True` hands out the parameters themselves, never copies; under ZeRO-3 they are still partitioned,
    so shapes come from DeepSpeed's `ds_shape`. LoRA adapters are not entries of their own: their base weight's
    entry carries them, under the name the weight had before the adapters were injected.
    """
    from lopt_dist.model.lora import LoraLayout  # here: lopt_dist.model imports this package's export

    out = []
    layout = LoraLayout(module)
    for key, tensor in module.state_dict(keep_vars=True).items():
        if layout.is_adapter(key):
            continue
        name = hf_name(layout.plain_key(key))
        if name is None:
            continue
        shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
        dtype = torch.float32 if isinstance(tensor, nn.Parameter) and tensor.dtype.is_floating_point else tensor.dtype
        out.append((ExportedTensor(name, key, shape, dtype, layout.delta(key)), tensor))
    return out


def merged_reader(read: Callable[[ExportedTensor], torch.Tensor]) -> Callable[[ExportedTensor], torch.Tensor]:
    """`read` (entry -> its stored value) that returns LoRA base weights with their adapters merged. The base,
    A and B are read in that order for every such entry (on DeepSpeed ranks each read may be a collective)."""

    def read_merged(entry: ExportedTensor) -> torch.Tensor:
        value = read(entry)
        delta = entry.lora
        if delta is None:
            return value
        a = read(ExportedTensor(delta.a_key, delta.a_key, delta.a_shape, torch.float32))
        b = read(ExportedTensor(delta.b_key, delta.b_key, delta.b_shape, torch.float32))
        return delta.merge(value, a, b)

    return read_merged


def write_manifest(stage_dir: Path, tensors: list[ExportedTensor], extra: dict | None = None) -> None:
    entries = [{"name": t.name, "key": t.key, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                **({"lora": asdict(t.lora)} if t.lora is not None else {})} for t in tensors]
    write_text(stage_dir / MANIFEST, json.dumps({"tensors": entries, **(extra or {})}, indent=1))


def read_manifest(stage_dir: Path) -> tuple[list[ExportedTensor], dict]:
    path = stage_dir / MANIFEST
    try:
        data = json.loads(path.read_text())
        tensors = [ExportedTensor(e["name"], e["key"], tuple(e["shape"]), getattr(torch, e["dtype"]), _delta(e))
                   for e in data.pop("tensors")]
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete: use another one") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path} is truncated or damaged ({err}); use another checkpoint") from None
    return tensors, data


def _delta(entry: dict) -> LoraDelta | None:
    lora = entry.get("lora")
    if lora is None:
        return None
    from lopt_dist.model.lora import LoraDelta

    return LoraDelta(lora["a_key"], tuple(lora["a_shape"]), lora["b_key"], tuple(lora["b_shape"]),
                     float(lora["scaling"]))
