"""Memory figures that mean the same thing on every worker: process RSS on CPU, allocator peaks on GPU."""

from __future__ import annotations

import resource

import torch


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Highest resident set size of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_snapshot(device: torch.device) -> dict[str, int]:
    snap = {"rss_bytes": current_rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        snap["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        snap["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        snap.update(_nvml_used(device))
    return snap


def _nvml_used(device: torch.device) -> dict[str, int]:
    try:
        import pynvml  # from nvidia-ml-py

        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return {"nvml_used_bytes": int(info.used)}
    except Exception:  # NVML is optional telemetry: a missing driver library must not stop training
        return {}
