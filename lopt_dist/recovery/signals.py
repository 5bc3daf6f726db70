"""SIGTERM and SIGINT to the driver: stop at a checkpoint within a grace period; a second signal aborts.

Schedulers preempt a job with SIGTERM and kill it some seconds later (Kubernetes: the pod's
terminationGracePeriodSeconds, 30 s by default; Slurm: KillWait, 30 s by default). On the first SIGTERM or
SIGINT the run queues no further step, lets its workers finish the steps they already have (at most two),
commits a checkpoint of the state after them if that fits in `runtime.preemption_grace_s` (a checkpoint whose
files were all written is always committed), stops the workers and ends with RunStopped, which the CLI turns
into its exit code 75 and the `--resume` command. While the pipeline is starting or restarting there is no state to
save, and the signal interrupts at once. A second signal aborts at once.

Ray's `ray.init` installs SIGTERM handlers in the driver that exit at once (taking an embedded cluster down
mid-step). `install` is called after Ray is connected, so these handlers replace Ray's; `uninstall` puts the
previous ones back. Signals reach only the main thread, so a run started from another thread keeps the
default behaviour.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

class RunStopped(Exception):
    """The run stopped on a signal. `step`: steps done; `checkpoint`: the newest committed checkpoint (None: none),
    `saved`: whether it holds the state at the stop (else it is older: no checkpoint fitted in the grace period)."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None, saved: bool) -> None:
        self.signal_name, self.step, self.checkpoint, self.saved = signal_name, step, checkpoint, saved
        super().__init__(self.one_line("--resume"))

    def one_line(self, resume_command: str) -> str:
        if self.checkpoint is None:
            return f"stopped by {self.signal_name} after step {self.step}; no checkpoint was committed: run it again"
        what = "saved the state in" if self.saved else "no checkpoint fitted in the grace period; the newest is"
        return (f"stopped by {self.signal_name} after step {self.step}; {what} {self.checkpoint}; continue with: "
                f"{resume_command}")

    def __reduce__(self):
        return RunStopped, (self.signal_name, self.step, self.checkpoint, self.saved)


class GraceExpired(Exception):
    """The grace period after a stop signal ran out before the step or the checkpoint being waited for ended."""


class StopSignals:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.received: str | None = None  # the first signal's name
        self.aborting = False  # a second signal came
        self.deadline: float | None = None
        self._interruptible = 0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def remaining_s(self) -> float:
        return float("inf") if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """While inside, a first signal interrupts at once (KeyboardInterrupt): nothing there needs saving."""
        if self.requested:
            raise KeyboardInterrupt(self.received)
        self._interruptible += 1
        try:
            yield
        finally:
            self._interruptible -= 1

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            self.aborting = True
            logger.warning("%s again: aborting now, without a checkpoint", name)
            raise KeyboardInterrupt(name)
        self.received, self.deadline = name, time.monotonic() + self.grace_s
        logger.warning("%s: stopping after the queued steps, with a checkpoint if one fits in %g s "
                       "(runtime.preemption_grace_s); send it again to abort at once", name, self.grace_s)
        if self._interruptible:
            raise KeyboardInterrupt(name)
