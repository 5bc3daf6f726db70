"""Busy time of a worker: how long its device computed, measured where the computing happens.

On a CPU the host runs the kernels, so wall-clock around each span of work is the busy time. On a GPU the
host only queues kernels and returns: wall-clock would time the launches. There a pair of CUDA events marks
each span on the compute stream, and the elapsed times are read once, when the step's total is asked for.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class BusyClock:
    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._host_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextlib.contextmanager
    def span(self) -> Iterator[None]:
        """Count the work queued (GPU) or done (CPU) inside the block as busy."""
        if not self._cuda:
            start = time.perf_counter()
            yield
            self._host_s += time.perf_counter() - start
            return
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        yield
        end.record()
        self._events.append((begin, end))

    def total_s(self) -> float:
        """Busy seconds so far; on a GPU this waits for the last span's kernels to finish."""
        if self._events:
            self._events[-1][1].synchronize()
        return self._host_s + sum(begin.elapsed_time(end) for begin, end in self._events) / 1e3
