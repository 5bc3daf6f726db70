"""Safetensors files written tensor by tensor, and split into shards of bounded size.

The safetensors layout is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte
range) and the raw bytes. Because the header only needs names, shapes and dtypes, a file can be opened with
its full header and then filled one tensor at a time as each becomes available (a ZeRO-3 gather, a read from a
checkpoint partition): the writer never holds more than the tensor it is writing.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lopt_dist.checkpoint.files import CheckpointError, os_errors_named

_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Shard:
    """One written shard file: small metadata, safe to send from a worker to the driver."""

    file: str  # name inside the export directory
    names: list[str] = field(default_factory=list)
    nbytes: int = 0  # tensor bytes (the index's total_size counts these)


class SafetensorsFile:
    """A safetensors file whose tensors are written one by one, in the order of `specs`."""

    def __init__(self, path: Path, specs: list[TensorSpec], metadata: dict[str, str] | None = None) -> None:
        self.path = path
        self._pending = list(specs)
        header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        for spec in specs:
            if spec.dtype not in _DTYPE_CODES:
                raise TypeError(f"{spec.name}: dtype {spec.dtype} cannot be written to safetensors here")
            header[spec.name] = {"dtype": _DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                                 "data_offsets": [offset, offset + spec.nbytes]}
            offset += spec.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        with os_errors_named(path):
            self._fh = open(path, "wb")
            self._guarded(self._fh.write, struct.pack("<Q", len(raw)) + raw)

    def _guarded(self, call, *args) -> None:
        try:
            with os_errors_named(self.path):
                call(*args)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec = self._pending.pop(0) if self._pending else None
        if spec is None or spec.name != name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(f"{self.path}: expected {spec} next, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self._guarded(self._fh.write, memoryview(data))

    def close(self) -> None:
        if self._pending:
            self.abort()
            raise ValueError(f"{self.path}: closed before {self._pending[0].name} was written")
        self._guarded(self._fh.flush)
        self._guarded(os.fsync, self._fh.fileno())
        self._fh.close()

    def abort(self) -> None:
        try:
            self._fh.close()
        except OSError:
            pass  # the error that made us abort is the one to report


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    specs = [TensorSpec(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    out = SafetensorsFile(path, specs, metadata)
    for name, tensor in tensors.items():
        out.write(name, tensor)
    out.close()


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a (small) file, with its metadata; a missing or damaged file is named."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; resume from (or export) another checkpoint") from None
    except Exception as err:  # SafetensorError for truncated or foreign files
        raise CheckpointError(f"{path} cannot be read ({err}); it is truncated or damaged: resume from "
                              "(or export) another checkpoint") from None


class SafetensorsReader:
    """Tensors of a safetensors file read one at a time with plain reads: no memory map, so reading a whole
    stage this way never keeps more than the tensor being read in memory."""

    _DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with open(path, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(length))
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing; resume from (or export) another checkpoint") from None
        except (struct.error, ValueError) as err:
            raise CheckpointError(f"{path} cannot be read ({err}); it is truncated or damaged") from None
        header.pop("__metadata__", None)
        self._entries = header
        self._data_start = 8 + length

    def __call__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        buffer = bytearray(end - begin)
        with open(self.path, "rb") as fh:
            fh.seek(self._data_start + begin)
            if fh.readinto(buffer) != len(buffer):
                raise CheckpointError(f"{self.path} is truncated (in {name}); use another checkpoint")
        dtype = self._DTYPES[entry["dtype"]]
        if not buffer:
            return torch.empty(entry["shape"], dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry["shape"])


def plan_shards(specs: Iterable[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors grouped into shards of at most `max_bytes` (a larger tensor gets a shard alone)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (size + spec.nbytes > max_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


class ShardedWriter:
    """Writes tensors, in the order of `specs`, into `<prefix>-00001.safetensors`, ... of at most `max_bytes`."""

    def __init__(self, directory: Path, prefix: str, specs: list[TensorSpec], max_bytes: int) -> None:
        self.directory = directory
        self._plan = plan_shards(specs, max_bytes)
        self._prefix = prefix
        self._current: SafetensorsFile | None = None
        self._left = 0
        self.shards: list[Shard] = []

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._current is None:
            specs = self._plan[len(self.shards)]
            shard = Shard(f"{self._prefix}-{len(self.shards) + 1:05d}.safetensors", [s.name for s in specs],
                          sum(s.nbytes for s in specs))
            self.shards.append(shard)
            self._current, self._left = SafetensorsFile(self.directory / shard.file, specs), len(specs)
        self._current.write(name, tensor)
        self._left -= 1
        if self._left == 0:
            self._current.close()
            self._current = None

    def close(self) -> list[Shard]:
        if self._current is not None or len(self.shards) != len(self._plan):
            if self._current is not None:
                self._current.abort()
            raise ValueError(f"{self.directory}: the export of {self._prefix} ended before all its tensors came")
        return self.shards
