"""Fault injection for tests: a worker kills, stops or fails itself at a chosen step and place.

    LOPT_FAULTS=/tmp/run/faults.json     set before Ray starts, so that every worker process inherits it
    [{"stage": 1, "rank": 0, "at": "train_step", "step": 3, "action": "SIGKILL",
      "once": "/tmp/run/fired-0"}]

`at`: "train_step" (right after the step's first micro-batch was sent on: the step is half done and the next
stage has part of it) or "save_checkpoint" (when the worker starts writing the checkpoint of the state after
`step` steps, while the other workers write theirs). `action`: "SIGKILL" or "SIGSTOP", sent by the worker to
its own process, so they are the real signals with their real effects; or "raise" (a RuntimeError). `once`: a
file created just before the fault fires; a fault whose file exists never fires again, since a restarted worker
passes the same step again (without `once` the fault fires every time: a deterministic failure).
The list is read when the worker starts; without LOPT_FAULTS nothing is read and nothing fires.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path

ENV = "LOPT_FAULTS"


@dataclass(frozen=True)
class Fault:
    stage: int
    rank: int
    at: str
    step: int
    action: str
    once: str | None = None


class FaultInjector:
    def __init__(self, stage: int, rank: int) -> None:
        path = os.environ.get(ENV)
        faults = [Fault(**f) for f in json.loads(Path(path).read_text())] if path else []
        self._faults = [f for f in faults if (f.stage, f.rank) == (stage, rank)]

    def maybe_fire(self, at: str, step: int) -> None:
        for fault in self._faults:
            if (fault.at, fault.step) != (at, step) or (fault.once and Path(fault.once).exists()):
                continue
            if fault.once:
                Path(fault.once).write_text(f"{fault}\n")
            if fault.action == "raise":
                raise RuntimeError(f"injected fault: {fault}")
            os.kill(os.getpid(), getattr(signal, fault.action))
