"""Memory figures that mean the same thing on every worker: process RSS on CPU, allocator peaks on GPU.

Peaks are per step: each trainer calls `reset_peak` when a step begins, so a step's peak covers that step
(resident weights, optimizer state and its activations) and not the loading of the whole model at start-up.
"""

from __future__ import annotations

import contextlib
import resource

import torch

from lopt_dist.telemetry.nvml import nvml_used_bytes


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Highest resident set size since the last `reset_peak` (or since start)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # lifetime peak, never reset


def reset_peak(device: torch.device) -> int:
    """Start the peak over from now; returns the memory in use now, the floor the next peak starts from."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    # Linux (4.0+): writing 5 resets the process's peak resident set size (VmHWM) to its current size.
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return current_rss_bytes()


def memory_snapshot(device: torch.device) -> dict[str, int]:
    snap = {"rss_bytes": current_rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        snap["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        snap["cuda_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
        snap.update(nvml_used_bytes(device))
    return snap


def step_peak_bytes(snapshot: dict[str, int]) -> int:
    """The one peak figure a step reports from its `memory_snapshot`: CUDA peak allocation, else peak RSS."""
    return snapshot.get("cuda_peak_allocated_bytes", snapshot["peak_rss_bytes"])
