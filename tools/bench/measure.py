"""What every benchmark worker measures about itself, and the record it hands back to the driver.

Times are wall-clock (`time.time`) so that the events of different processes on one machine line up on a
common timeline; durations of a few milliseconds and up are all the report needs.
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lopt_dist.telemetry.memory import peak_rss_bytes

# What counts as computing; everything else a worker does in a step is sending, receiving or waiting.
COMPUTE_KINDS = ("forward", "backward", "backward_input", "backward_weight", "optimizer")


@dataclass(frozen=True)
class Event:
    kind: str  # one of COMPUTE_KINDS, or "send", "send_wait", "recv_wait"
    start: float
    end: float
    micro_batch: int | None = None
    stage: int | None = None


class EventLog:
    """A worker's time split for the current step, and every event of the one step the timeline shows."""

    def __init__(self, keep_step: int, device: torch.device) -> None:
        self.keep_step = keep_step
        # CUDA kernels run asynchronously: a span must wait for them to end, or it would time only the launch.
        self.sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
        self.step = -1
        self.compute_s = 0.0  # this step so far
        self.blocked_s = 0.0  # this step so far: sends, receives and waits
        self.kept: list[Event] = []

    def begin_step(self, step: int) -> None:
        self.step, self.compute_s, self.blocked_s = step, 0.0, 0.0

    def record(self, kind: str, start: float, end: float, micro_batch: int | None = None,
               stage: int | None = None) -> None:
        if kind in COMPUTE_KINDS:
            self.compute_s += end - start
        else:
            self.blocked_s += end - start
        if self.step == self.keep_step:
            self.kept.append(Event(kind, start, end, micro_batch, stage))

    @contextlib.contextmanager
    def span(self, kind: str, micro_batch: int | None = None, stage: int | None = None) -> Iterator[None]:
        start = time.time()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            self.record(kind, start, time.time(), micro_batch, stage)


@dataclass(kw_only=True)
class WorkerRecord:
    """One worker's figures over all steps (warm-up included; the driver drops those)."""

    label: str
    device: str
    windows: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each step, wall clock
    busy_s: list[float] = field(default_factory=list)  # per step: forward, backward, optimizer
    comm_s: list[float | None] = field(default_factory=list)  # per step: blocked on communication; None: unmeasured
    bytes_sent: list[int | None] = field(default_factory=list)  # per step; None: unmeasured
    bytes_received: list[int | None] = field(default_factory=list)
    # Per step: the task loss summed over the micro-batches whose loss this worker computes; None if none.
    loss_sums: list[float] | None = None
    # Per step: real (non-padding) tokens this worker fed into the model, where samples vary (--data); None: the
    # fixed-length samples, whose count the settings give. Single-device workers and first-stage workers only.
    tokens: list[int] | None = None
    peak_mem_bytes: int = 0  # since set-up ended
    mem_at_start_bytes: int = 0  # in use when set-up ended: weights, optimizer (if built eagerly), the runtime
    mem_kind: str = "peak RSS"
    events: list[Event] = field(default_factory=list)  # the timeline step only


def peak_memory(device: torch.device) -> tuple[int, str]:
    """The peak since the last `reset_peak`. Every row resets it when a step begins (lopt-dist's trainers do
    so themselves) and keeps the largest step peak: training, not the loading of the whole model."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA peak allocated"
    return peak_rss_bytes(), "peak RSS"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
