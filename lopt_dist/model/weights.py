"""A checkpoint's tensors, read one at a time from its safetensors files, and only the ones asked for.

The checkpoint is a local directory (an alias resolves to its converted directory) or a Hugging Face hub id;
its tensors live in `model.safetensors` or in the shards listed by `model.safetensors.index.json`. For a hub
id only the index and the shards a reader actually needs are downloaded.

Each tensor is read into memory allocated for it in the run's dtype on the worker's device, a bounded chunk
of rows at a time, so a float32 file read for a bf16 run never holds more than one chunk in float32. Files
are read with `pread` where safetensors offers it (0.8+): memory-mapped reads would leave every page a
worker touched counted in its resident memory while the file is open.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from lopt_dist.config import ConfigError
from lopt_dist.model.key_plan import plan_checkpoint
from lopt_dist.model.loading import resolve_model_path

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CHUNK_BYTES = 64 * 2**20  # largest piece of a tensor held in the file's dtype while converting
_FILE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


class WeightFiles:
    """The tensors of the checkpoint `name`, with a record of what was read (tests and benchmarks check it)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.location = resolve_model_path(name)
        self.is_local = Path(self.location).is_dir()
        self.weight_map = self._weight_map()  # tensor name -> file name, relative to the checkpoint
        self.tensors_read: list[str] = []
        self.files_opened: list[str] = []
        self.bytes_read = 0
        self._open_file: str | None = None
        self._handle = None

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def read(self, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Tensor `key` as a new `dtype` tensor on `device`."""
        if key not in self.weight_map:
            raise ConfigError(f"model.name: {self.location} has no tensor {key!r}, which the model's layout "
                              "needs; the checkpoint does not match its config.json (re-save it with "
                              "save_pretrained)")
        handle = self._file(self.weight_map[key])
        piece = handle.get_slice(key)
        shape = piece.get_shape()
        if _FILE_DTYPES.get(piece.get_dtype()) == dtype or not shape:
            # Already in the run's dtype (or a scalar): read as is, into memory of its own.
            out = handle.get_tensor(key).to(device=device, dtype=dtype)
            self.bytes_read += out.numel() * out.element_size()
        else:
            out = torch.empty(shape, dtype=dtype, device=device)
            row_bytes = max(1, out[0].numel()) * 8  # no file dtype is wider than 8 bytes
            rows = max(1, CHUNK_BYTES // row_bytes)
            for start in range(0, shape[0], rows):
                end = min(start + rows, shape[0])
                chunk = piece[start:end]
                out[start:end].copy_(chunk)
                self.bytes_read += chunk.numel() * chunk.element_size()
        self.tensors_read.append(key)
        return out

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle, self._open_file = None, None

    def _file(self, file: str):
        # One file open at a time: a stage's tensors come in the order the shards hold them.
        if file != self._open_file:
            self.close()
            self._handle = _safe_open(self._fetch(file, required=True))
            self._open_file = file
            if file not in self.files_opened:
                self.files_opened.append(file)
        return self._handle

    def _weight_map(self) -> dict[str, str]:
        index = self._fetch(INDEX_FILE)
        if index is not None:
            return json.loads(index.read_text())["weight_map"]
        single = self._fetch(SINGLE_FILE)
        if single is not None:
            handle = _safe_open(single)
            try:
                return {key: SINGLE_FILE for key in handle.keys()}
            finally:
                handle.__exit__(None, None, None)
        raise ConfigError(self._no_safetensors_message())

    def _fetch(self, file: str, required: bool = False) -> Path | None:
        """The local path of a checkpoint file, downloading it first for a hub id; None if it does not exist."""
        if self.is_local:
            path = Path(self.location) / file
            if path.is_file() or not required:
                return path if path.is_file() else None
            raise ConfigError(f"model.name: {path} is listed in {INDEX_FILE} but missing; re-download or re-save "
                              "the checkpoint")
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return Path(hf_hub_download(self.location, file))
        except EntryNotFoundError:
            if required:
                raise
            return None

    def _no_safetensors_message(self) -> str:
        where = self.location
        found = ""
        if self.is_local:
            weights = sorted(p.name for p in Path(where).iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
            found = f" (it has {', '.join(weights[:3])})" if weights else ""
        return (f"model.name: {where} has no {SINGLE_FILE} or {INDEX_FILE}{found}; stage workers read only "
                "their own tensors, from safetensors files. Convert it once with: python -c \"from transformers "
                f"import AutoModelForCausalLM as M; M.from_pretrained('{where}').save_pretrained('OUT_DIR')\" "
                "and set model.name to OUT_DIR")


def check_readable(name: str) -> None:
    """Before any worker starts: a local checkpoint (or an alias's converted one) must have safetensors files
    that hold every tensor of the model, under names whose conversion each stage can make alone (key_plan.py).
    Only names are read; a hub id is planned by each worker, before it reads a weight."""
    if Path(resolve_model_path(name)).is_dir():
        files = WeightFiles(name)
        plan_checkpoint(files.location, files.weight_map)


def _safe_open(path: Path):
    try:
        handle = safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:  # safetensors before 0.8 has only memory-mapped reads
        handle = safe_open(str(path), framework="pt", device="cpu")
    return handle.__enter__()
