"""How long the driver waits on a step or a checkpoint before it calls the wait a hang.

The first step after a (re)start may take `runtime.first_step_timeout_s` (lazy initialisation, communicators,
a restarted stage catching up); every later step `runtime.step_timeout_factor` times the median step time
measured so far, but at least `runtime.step_timeout_min_s`. A checkpoint save or load may take
`runtime.save_timeout_s`. Step times are measured between the moments the driver collects consecutive steps,
leaving out checkpoint saves and the first step, so a slow save or warm-up never inflates the bound.
"""

from __future__ import annotations

import statistics
import time
from collections import deque

from lopt_dist.config import RuntimeConfig

_WINDOW = 100  # the median of the last this many steps: follows a run whose steps slow down (longer sequences)


class StepDeadlines:
    def __init__(self, runtime: RuntimeConfig) -> None:
        self.runtime = runtime
        self._times: deque[float] = deque(maxlen=_WINDOW)
        self._first = True
        self._catch_up = 0
        self._since: float | None = None

    def restart(self, catch_up_steps: int = 0) -> None:
        """A (re)start: the next step is a first one; `catch_up_steps` more steps must be redone before it."""
        self._first, self._catch_up, self._since = True, catch_up_steps, None

    def step_bound(self) -> float:
        """Seconds the step now awaited may take, counted from `waiting()`."""
        runtime = self.runtime
        steady = runtime.step_timeout_min_s
        if self._times:
            steady = max(steady, runtime.step_timeout_factor * statistics.median(self._times))
        if self._first:
            return runtime.first_step_timeout_s + self._catch_up * steady
        return steady

    def save_bound(self) -> float:
        return self.runtime.save_timeout_s

    def waiting(self) -> None:
        """The driver starts waiting on a step (after collecting the previous step and its save, if any)."""
        self._since = time.monotonic()

    def step_done(self) -> float:
        """The awaited step is collected; returns how long it took since `waiting()`."""
        took = time.monotonic() - self._since if self._since is not None else 0.0
        if not self._first:
            self._times.append(took)
        self._first, self._catch_up = False, 0
        return took
