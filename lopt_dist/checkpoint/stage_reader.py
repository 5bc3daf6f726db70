"""Reading a stage's fp32 master weights from a checkpoint, one tensor at a time, for `lopt-export`.

DeepSpeed's `zero_to_fp32` has a lazy mode only for ZeRO-3 and concatenates whole ZeRO-2 groups, so the
partitions are read here per tensor instead, from memory-mapped files (`torch.load(mmap=True,
weights_only=True)`):
- ZeRO 1-2 and BF16_Optimizer: each rank's optimizer file maps parameter names to a fragment of its flat fp32
  partition (`param_slice_mappings`); a parameter is its fragments in rank order;
- ZeRO-3: each rank holds ceil(n / world) elements of every parameter, back to back in `param_shapes` order;
  frozen parameters (LoRA bases) are not in the optimizer: each rank's model states hold its slice of them
  (`frozen_param_fragments`);
- ZeRO-0: the parameters themselves (fp32), or the fp32 copies of the bf16 wrapper (`fp32_groups`), in the
  order the worker recorded in `tensors.json`.
Each tensor is copied out and its pages of the mapping are then handed back to the kernel, so the process holds
one tensor, not the stage. The single-process trainer's `model.safetensors` is read with plain reads.
Each result is checked against the shape the stage recorded, so a layout this code does not know fails loudly.
"""

from __future__ import annotations

import ctypes
import math
import os
import re
import sys
from pathlib import Path

import torch

from lopt_dist.checkpoint.files import CheckpointError
from lopt_dist.checkpoint.safe_load import load_tensors_file
from lopt_dist.checkpoint.safetensors_io import SafetensorsReader
from lopt_dist.checkpoint.tensor_manifest import ExportedTensor


def open_stage(stage_dir: Path, manifest_extra: dict):
    """A callable ExportedTensor -> fp32 tensor for one stage directory of a checkpoint."""
    if (stage_dir / "model.safetensors").is_file():
        reader = SafetensorsReader(stage_dir / "model.safetensors")
        return lambda entry: _checked(entry, reader(entry.key), reader.path)
    if (stage_dir / "state").is_dir():
        return _DeepSpeedStage(stage_dir / "state", manifest_extra.get("fp32_master_order"))
    raise CheckpointError(f"{stage_dir} holds no stage state (no model.safetensors, no DeepSpeed state/); "
                          "export another checkpoint")


def _checked(entry: ExportedTensor, tensor: torch.Tensor, source: Path) -> torch.Tensor:
    if tensor.numel() != math.prod(entry.shape):
        raise CheckpointError(f"{source}: {entry.key} has {tensor.numel()} elements, the stage recorded shape "
                              f"{list(entry.shape)}; the checkpoint's layout is not one lopt-export knows")
    return tensor.reshape(entry.shape)


def _rank_of(path: Path) -> int:
    match = re.search(r"zero_pp_rank_(\d+)_", path.name)
    return int(match.group(1)) if match else 0


class _DeepSpeedStage:
    def __init__(self, state_dir: Path, master_order: list[list[str]] | None) -> None:
        self.dir = state_dir
        model_files = sorted(state_dir.glob("*model_states.pt"), key=_rank_of)
        if not model_files:
            raise CheckpointError(f"{state_dir} holds no DeepSpeed model states file; export another checkpoint")
        optim_files = sorted(state_dir.glob("*optim_states.pt"), key=_rank_of)
        self.model_files = model_files
        self.model = load_tensors_file(model_files[0], deepspeed=True, mmap=True)
        self.optim = [load_tensors_file(f, deepspeed=True, mmap=True)["optimizer_state_dict"] for f in optim_files]
        self._mapped = _MappedFiles([*model_files, *optim_files])
        self._pieces = self._pick_layout(master_order)

    def __call__(self, entry: ExportedTensor) -> torch.Tensor:
        pieces = self._pieces(entry.key)
        value = torch.cat([p.reshape(-1) for p in pieces]).float()  # a copy: the mapped pages can go
        for piece in pieces:
            self._mapped.drop_pages(piece)
        return _checked(entry, value, self.dir)

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
            return lambda key: [masters[key]]
        module = self.model["module"]
        low = [k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32]
        if low:
            raise CheckpointError(f"{self.dir}: the weights are {module[low[0]].dtype} and no fp32 master copy was "
                                  "found; lopt-export would lose precision, so it stops")
        return lambda key: [module[key]]

    def _zero3_frozen(self) -> dict[str, list[torch.Tensor]]:
        if not self.model.get("frozen_param_shapes"):
            return {}
        models = [self.model] + [load_tensors_file(f, deepspeed=True, mmap=True) for f in self.model_files[1:]]
        return _frozen_slices(models)

    def _fragments(self):
        """ZeRO 1-2 / BF16_Optimizer: name -> its fragments [(rank, group, start, numel)], in rank order."""
        where: dict[str, list[tuple[int, int, int, int]]] = {}
        for rank, osd in enumerate(self.optim):
            for group, mapping in enumerate(osd["param_slice_mappings"]):
                for name, fragment in mapping.items():
                    where.setdefault(name, []).append((rank, group, fragment.start, fragment.numel))
        buffers = self.model["module"]

        def pieces(key: str) -> list[torch.Tensor]:
            if key not in where:
                return [buffers[key]]
            return [self.optim[r]["single_partition_of_fp32_groups"][g].narrow(0, start, numel)
                    for r, g, start, numel in where[key]]

        return pieces

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
        frozen = self._zero3_frozen()

        def pieces(key: str) -> list[torch.Tensor]:
            if key in frozen:
                return frozen[key]
            if key not in shapes:
                return [buffers[key]]
            numel = math.prod(shapes[key])
            part = math.ceil(numel / world)
            out = []
            for groups in flats:  # rank by rank; the last rank's share ends with padding
                out.extend(_flat_slice(groups, offsets[key], part))
            return _first(out, numel)

        return pieces


def _frozen_slices(models: list[dict]) -> dict[str, list[torch.Tensor]]:
    """ZeRO-3 frozen parameters: name -> each rank's slice, in rank order, cut to the parameter's size."""
    shapes = models[0].get("frozen_param_shapes") or {}
    return {name: _first([m["frozen_param_fragments"][name].reshape(-1) for m in models], math.prod(shape))
            for name, shape in shapes.items()}


def _flat_slice(groups: list[torch.Tensor], start: int, numel: int) -> list[torch.Tensor]:
    """Views of elements [start, start + numel) of the concatenation of `groups`, without concatenating."""
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
    return pieces


def _first(pieces: list[torch.Tensor], numel: int) -> list[torch.Tensor]:
    """The views covering the first `numel` elements of `pieces` (drops ZeRO-3's padding)."""
    out = []
    for piece in pieces:
        if numel == 0:
            break
        take = min(numel, piece.numel())
        out.append(piece.narrow(0, 0, take))
        numel -= take
    return out


class _MappedFiles:
    """Hands pages of memory-mapped checkpoint files back to the kernel once a tensor was copied out of them.

    The pages are clean and file-backed (`torch.load(mmap=True)` maps privately and nothing writes them), so the
    kernel re-reads them from the file if they are touched again. Only ranges inside a mapping of one of the
    given files are released (checked against /proc/self/maps): on ordinary memory the same call would zero it.
    A no-op where /proc or madvise are not available.
    """

    _MADV_DONTNEED = 4

    def __init__(self, files: list[Path]) -> None:
        self._ranges: list[tuple[int, int]] = []
        self._libc = None
        if not sys.platform.startswith("linux"):
            return
        names = {str(Path(f).resolve()) for f in files}
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5] in names:
                low, high = (int(x, 16) for x in fields[0].split("-"))
                self._ranges.append((low, high))
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._page = os.sysconf("SC_PAGE_SIZE")

    def drop_pages(self, tensor: torch.Tensor) -> None:
        if self._libc is None or tensor.numel() == 0:
            return
        start = tensor.data_ptr() // self._page * self._page
        end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // self._page) * self._page
        for low, high in self._ranges:
            if low <= start and end <= high:
                self._libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), self._MADV_DONTNEED)
                return
