"""Typed errors of the Ray worker groups, so the driver can tell "fix your request" from "a worker broke"."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


class WorkerGroupError(RuntimeError):
    """Base of every error a worker group raises on purpose."""


class WorkerGroupStartError(WorkerGroupError):
    """A group could not start: its resources do not fit, did not come in time, or a worker failed in start-up.

    The message says what was asked, what the cluster has, and what to change.
    """


class WorkerFailedError(WorkerGroupError):
    """A worker raised or died while the driver waited on it.

    `label` names the worker ("stage 0 worker 1"), `error` is its original error in one line and `details`
    the remote traceback or Ray's account of the death, when there is one.
    """

    def __init__(self, label: str, error: str, details: str = "", *, died: bool = False) -> None:
        self.label = label
        self.error = error
        self.details = details
        self.died = died
        verb = "died" if died else "raised"
        text = f"{label} {verb}: {error}"
        if details and details.strip() != error.strip():
            text += f"\n{details.rstrip()}"
        super().__init__(text)

    def __reduce__(self):
        # Exceptions are pickled with `self.args`, which here is the formatted text; rebuild from the fields.
        return _rebuild_worker_failed, (self.label, self.error, self.details, self.died)


def _rebuild_worker_failed(label: str, error: str, details: str, died: bool) -> WorkerFailedError:
    return WorkerFailedError(label, error, details, died=died)


class WorkerTimeoutError(WorkerGroupError):
    """`wait_all` ran out of time; `waiting_on` lists the labels of the workers that had not answered."""

    def __init__(self, waiting_on: list[str], timeout_s: float) -> None:
        self.waiting_on = list(waiting_on)
        self.timeout_s = timeout_s
        super().__init__(f"timed out after {timeout_s:g} s waiting on: {', '.join(self.waiting_on)}")

    def __reduce__(self):
        return WorkerTimeoutError, (self.waiting_on, self.timeout_s)


@dataclass
class Failure:
    """One failure of a pipeline, attributed to the worker that failed first (pipeline/health.py decides which).

    `kind`: "died" (the process is gone), "raised" (a method raised), "hung" (alive, but a step or save outran
    its bound) or "unresponsive" (did not even answer a status probe: a stopped process, a lost node).
    `phase`: what it was running: "train_step", "save_checkpoint", "load_checkpoint" or "start-up".
    """

    worker: str  # "stage 1 worker 0"
    kind: str
    cause: str  # one line
    phase: str
    step: int | None  # the step it was training, or the checkpoint's (the state after that many steps)
    stage: int | None = None
    node: str = ""  # the node's address
    pid: int | None = None
    details: str = ""  # the remote traceback, or Ray's account of the death
    others: dict[str, str] = field(default_factory=dict)  # what each other worker was doing
    user_error: bool = False  # a config, data or model problem (lopt_dist.errors): never retried
    notes: list[str] = field(default_factory=list)  # e.g. why the failed stage could not restart alone

    @property
    def where(self) -> str:
        if self.phase == "start-up" or self.step is None:
            return "start-up"
        if self.phase == "save_checkpoint":
            return f"saving the checkpoint of step {self.step}"
        if self.phase == "load_checkpoint":
            return f"loading the checkpoint of step {self.step}"
        return f"step {self.step}"

    def summary(self) -> str:
        place = ", ".join(p for p in (f"node {self.node}" if self.node else "", f"pid {self.pid}" if self.pid else "")
                          if p)
        return f"{self.worker} {self.kind}: {self.cause} (in {self.where}{', ' + place if place else ''})"

    def as_record(self) -> dict:
        record = dataclasses.asdict(self)
        record["summary"] = self.summary()
        return record


class PipelineFailure(WorkerFailedError):
    """A worker of a running pipeline died, raised or hung; `failure` names the worker that failed first.

    As a WorkerFailedError, `label` is that worker and `error` its cause in one line."""

    def __init__(self, failure: Failure, diagnosis=None) -> None:
        self.failure = failure
        self.diagnosis = diagnosis  # pipeline/health.py's Diagnosis, in the driver's process (not pickled)
        self.label, self.error, self.details = failure.worker, failure.cause, failure.details
        self.died = failure.kind == "died"
        text = failure.summary()
        if failure.others:
            text += "\n" + "\n".join(f"  meanwhile {label}: {doing}" for label, doing in failure.others.items())
        if failure.details and failure.details.strip() != failure.cause.strip():
            text += f"\n{failure.details.rstrip()}"
        WorkerGroupError.__init__(self, text)

    def __reduce__(self):
        return PipelineFailure, (self.failure,)
