"""What a stage worker is doing right now, readable while it is busy: the answer to the driver's status probe.

The worker's training thread notes each thing it starts (`Activity.set`, a few attribute writes, no lock);
the probe runs on the worker's control thread (a Ray concurrency group of its own, so it answers while
`train_step` blocks) and copies them. A worker blocked on a peer (`waits_on_peer`) is the victim of a hang,
not its cause: the driver blames the worker the others wait for (pipeline/health.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerStatus:
    pid: int
    step: int | None  # the step being trained (or last trained)
    doing: str  # e.g. "receiving micro-batch 11 from stage 0 worker 0"
    for_s: float  # how long it has been doing it
    waits_on_peer: bool
    steps_run: int  # train_step calls finished by this process
    checkpoint_loads: int  # load_checkpoint calls finished by this process
    first_step: int | None  # the first step this process trained
    replay_from: int | None = None  # the sender's replay log holds every micro-batch from this one (None: no log)

    def describe(self) -> str:
        step = f"step {self.step}, " if self.step is not None else ""
        return f"{step}{self.doing} for {self.for_s:.1f} s"


class Activity:
    def __init__(self) -> None:
        self.step: int | None = None
        self.first_step: int | None = None
        self.steps_run = 0
        self.checkpoint_loads = 0
        self.set("starting")

    def set(self, doing: str, *, waits_on_peer: bool = False) -> None:
        self.doing, self.waits_on_peer, self.since = doing, waits_on_peer, time.monotonic()

    def begin_step(self, step: int) -> None:
        self.step = step
        if self.first_step is None:
            self.first_step = step

    def end_step(self) -> None:
        self.steps_run += 1
        self.set(f"idle after step {self.step}")

    def status(self, replay_from: int | None = None) -> WorkerStatus:
        return WorkerStatus(pid=os.getpid(), step=self.step, doing=self.doing, for_s=time.monotonic() - self.since,
                            waits_on_peer=self.waits_on_peer, steps_run=self.steps_run,
                            checkpoint_loads=self.checkpoint_loads, first_step=self.first_step,
                            replay_from=replay_from)
