"""GPU memory as the driver sees it (NVML), for the GPU that a worker's torch device really is.

torch numbers GPUs within the process's CUDA_VISIBLE_DEVICES; NVML numbers every GPU of the machine. So
torch's index is not NVML's: the GPU is looked up by its UUID, which both report. NVML is initialised once
per process, and each GPU's handle is kept; if NVML is missing (no driver library) it is not asked again.
"""

from __future__ import annotations

from typing import Any


def nvml_uuid(torch_uuid: str) -> str:
    """NVML's spelling of a GPU UUID ("GPU-xxxxxxxx-..."), from torch's (with or without the prefix)."""
    text = str(torch_uuid)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


class Nvml:
    """NVML memory queries by GPU UUID; `library` is the pynvml module (nvidia-ml-py), loaded on first use."""

    def __init__(self, library: Any = None) -> None:
        self._lib = library
        self._ready: bool | None = None  # None: not tried yet
        self._handles: dict[str, Any] = {}

    def used_bytes(self, uuid: str) -> int | None:
        """Memory in use on the GPU with this UUID, all processes together; None when NVML cannot tell."""
        if not self._start():
            return None
        key = nvml_uuid(uuid)
        try:
            if key not in self._handles:
                self._handles[key] = self._lib.nvmlDeviceGetHandleByUUID(key)
            return int(self._lib.nvmlDeviceGetMemoryInfo(self._handles[key]).used)
        except Exception:  # NVML is optional telemetry: a query it refuses must not stop training
            return None

    def _start(self) -> bool:
        if self._ready is None:
            try:
                if self._lib is None:
                    import pynvml

                    self._lib = pynvml
                self._lib.nvmlInit()
                self._ready = True
            except Exception:  # no driver library, or no GPU: report nothing, and do not try again
                self._ready = False
        return self._ready


_NVML = Nvml()


def nvml_used_bytes(device) -> dict[str, int]:
    """{"nvml_used_bytes": ...} for a CUDA torch device, or {} where NVML cannot tell."""
    import torch

    used = _NVML.used_bytes(str(torch.cuda.get_device_properties(device).uuid))
    return {} if used is None else {"nvml_used_bytes": used}
