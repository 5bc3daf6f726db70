"""Typed errors of the Ray worker groups, so the driver can tell "fix your request" from "a worker broke"."""

from __future__ import annotations


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
