"""Reading a stage's fp32 master weights from a checkpoint, one tensor at a time, for `lopt-export`.

Files are memory-mapped (`torch.load(mmap=True, weights_only=True)`), so a tensor read touches only its own
bytes. DeepSpeed's `zero_to_fp32` has a lazy mode only for ZeRO-3 and concatenates whole ZeRO-2 groups, so the
partitions are read here per tensor instead:
- ZeRO 1-2 and BF16_Optimizer: each rank's optimizer file maps parameter names to a fragment of its flat fp32
  partition (`param_slice_mappings`); a parameter is its fragments in rank order;
- ZeRO-3: each rank holds ceil(n / world) elements of every parameter, back to back in `param_shapes` order;
- ZeRO-0: the parameters themselves (fp32), or the fp32 copies of the bf16 wrapper (`fp32_groups`), in the
  order the worker recorded in `tensors.json`;
- the single-process trainer: `model.safetensors`.
Each result is checked against the shape the stage recorded, so a layout this code does not know fails loudly.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from lopt_dist.checkpoint.files import CheckpointError
from lopt_dist.checkpoint.safe_load import load_tensors_file
from lopt_dist.checkpoint.tensor_manifest import ExportedTensor


def open_stage(stage_dir: Path, manifest_extra: dict):
    """A callable ExportedTensor -> fp32 tensor for one stage directory of a checkpoint."""
    if (stage_dir / "model.safetensors").is_file():
        return _SafetensorsStage(stage_dir / "model.safetensors")
    if (stage_dir / "state").is_dir():
        return _DeepSpeedStage(stage_dir / "state", manifest_extra.get("fp32_master_order"))
    raise CheckpointError(f"{stage_dir} holds no stage state (no model.safetensors, no DeepSpeed state/); "
                          "export another checkpoint")


def _checked(entry: ExportedTensor, tensor: torch.Tensor, source: Path) -> torch.Tensor:
    if tensor.numel() != math.prod(entry.shape):
        raise CheckpointError(f"{source}: {entry.key} has {tensor.numel()} elements, the stage recorded shape "
                              f"{list(entry.shape)}; the checkpoint's layout is not one lopt-export knows")
    return tensor.reshape(entry.shape)


class _SafetensorsStage:
    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(str(path), framework="pt")

    def __call__(self, entry: ExportedTensor) -> torch.Tensor:
        return _checked(entry, self._file.get_tensor(entry.key), self.path)


def _rank_of(path: Path) -> int:
    match = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(match.group(1)) if match else 0


class _DeepSpeedStage:
    def __init__(self, state_dir: Path, master_order: list[list[str]] | None) -> None:
        self.dir = state_dir
        model_files = sorted(state_dir.glob("*model_states.pt"), key=_rank_of)
        if not model_files:
            raise CheckpointError(f"{state_dir} holds no DeepSpeed model states file; export another checkpoint")
        self.model = load_tensors_file(model_files[0], deepspeed=True, mmap=True)
        optim_files = sorted(state_dir.glob("*optim_states.pt"), key=_rank_of)
        self.optim = [load_tensors_file(f, deepspeed=True, mmap=True)["optimizer_state_dict"] for f in optim_files]
        self._read = self._pick_layout(master_order)

    def __call__(self, entry: ExportedTensor) -> torch.Tensor:
        return _checked(entry, self._read(entry.key).float(), self.dir)

    def _pick_layout(self, master_order):
        if self.optim and "fp32_flat_groups" in self.optim[0]:
            return self._zero3()
        if self.optim and "single_partition_of_fp32_groups" in self.optim[0]:
            return self._fragments()
        wrapper = self.model.get("optimizer") or {}
        if "fp32_groups" in wrapper:
            if master_order is None:
                raise CheckpointError(f"{self.dir}: bf16 ZeRO-0 state without the parameter order in tensors.json")
            masters = {key: t for keys, ts in zip(master_order, wrapper["fp32_groups"]) for key, t in zip(keys, ts)}
            return masters.__getitem__
        module = self.model["module"]
        low = [k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32]
        if low:
            raise CheckpointError(f"{self.dir}: the weights are {module[low[0]].dtype} and no fp32 master copy was "
                                  "found; lopt-export would lose precision, so it stops")
        return module.__getitem__

    def _fragments(self):
        """ZeRO 1-2 / BF16_Optimizer: name -> [(rank, group, start, numel)], joined in rank order."""
        where: dict[str, list[tuple[int, int, int, int]]] = {}
        for rank, osd in enumerate(self.optim):
            for group, mapping in enumerate(osd["param_slice_mappings"]):
                for name, fragment in mapping.items():
                    where.setdefault(name, []).append((rank, group, fragment.start, fragment.numel))
        buffers = self.model["module"]

        def read(key: str) -> torch.Tensor:
            if key not in where:
                return buffers[key]
            flats = [self.optim[r]["single_partition_of_fp32_groups"][g].narrow(0, start, numel)
                     for r, g, start, numel in where[key]]
            return torch.cat(flats)

        return read

    def _zero3(self):
        """ZeRO-3: each rank holds ceil(n / world) elements of each parameter, in `param_shapes` order."""
        world = len(self.optim)
        shapes = {k: v for group in self.model["param_shapes"] for k, v in group.items()}
        offsets, offset = {}, 0
        for name, shape in shapes.items():
            offsets[name] = offset
            offset += math.ceil(math.prod(shape) / world)
        flats = [osd["fp32_flat_groups"] for osd in self.optim]
        held = sum(t.numel() for t in flats[0])
        if offset != held:
            raise CheckpointError(f"{self.dir}: ZeRO-3 partitions hold {held} elements per rank, the parameters "
                                  f"need {offset}; the checkpoint's layout is not one lopt-export knows")
        buffers = self.model["module"]

        def read(key: str) -> torch.Tensor:
            if key not in shapes:
                return buffers[key]
            numel = math.prod(shapes[key])
            part = math.ceil(numel / world)
            pieces = [_flat_slice(groups, offsets[key], part) for groups in flats]
            return torch.cat(pieces)[:numel]

        return read


def _flat_slice(groups: list[torch.Tensor], start: int, numel: int) -> torch.Tensor:
    """Elements [start, start + numel) of the concatenation of `groups`, without concatenating them."""
    pieces = []
    for flat in groups:
        if numel == 0:
            break
        if start >= flat.numel():
            start -= flat.numel()
            continue
        take = min(numel, flat.numel() - start)
        pieces.append(flat.narrow(0, start, take))
        start, numel = 0, numel - take
    if not pieces:
        return groups[0].new_empty(0)
    return torch.cat(pieces) if len(pieces) != 1 else pieces[0]
