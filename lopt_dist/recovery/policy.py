"""Which failures a run retries, and what it says when it gives up.

The rule, in order (README "Failures, hangs and preemption"):
1. a user error (a config, data, model or checkpoint problem; lopt_dist.errors) is never retried: it would
   fail the same way again, and its message names the fix;
2. a failure while the run first starts (before its first step is queued) is not retried either: the request
   does not fit, a model does not load; the message says why;
3. `runtime.max_failures: 0` fails fast;
4. the same worker failing at the same place (step and phase) twice is deterministic and is not retried again;
5. at most `runtime.max_failures` failures per invocation are recovered from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lopt_dist.pipeline.errors import Failure, WorkerGroupError


@dataclass(frozen=True)
class Decision:
    retry: bool
    reason: str  # why the run stops, or which restart this is


class RetryPolicy:
    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.failures: list[Failure] = []

    def decide(self, failure: Failure, *, started: bool) -> Decision:
        """`started`: the pipeline of this invocation started once (set-up and checkpoint load done)."""
        earlier = list(self.failures)
        self.failures.append(failure)
        if failure.user_error:
            return Decision(False, "it is a user error (config, data, model or checkpoint), which a retry cannot fix")
        if not started:
            return Decision(False, "it happened while the run was starting, before its first step")
        if self.max_failures == 0:
            return Decision(False, "runtime.max_failures is 0 (fail fast)")
        if any((f.worker, f.phase, f.step) == (failure.worker, failure.phase, failure.step) for f in earlier):
            return Decision(False, f"{failure.worker} failed in {failure.where} before: a failure that repeats at "
                                   "the same place is deterministic and is not retried again")
        if len(self.failures) > self.max_failures:
            return Decision(False, f"that is failure {len(self.failures)} of this run, and runtime.max_failures is "
                                   f"{self.max_failures}")
        return Decision(True, f"recovery {len(self.failures)} of at most {self.max_failures}")


class RunFailedError(WorkerGroupError):
    """A run stopped after a worker failure it could not or may not recover from.

    `failure` is the last failure (blamed on the worker that failed first), `reason` why it was not retried,
    `checkpoint` the newest committed checkpoint (None: none was written), from which `--resume` continues.
    """

    def __init__(self, failure: Failure, reason: str, checkpoint: Path | None, failures: int) -> None:
        self.failure = failure
        self.reason = reason
        self.checkpoint = checkpoint
        self.failures = failures
        super().__init__(self.one_line("lopt-train ... --resume"))

    def one_line(self, resume_command: str) -> str:
        """The message in one line, with the command that continues the run."""
        if self.checkpoint is None:
            after = "No checkpoint was committed: run it again from the start"
        else:
            after = f"Last committed checkpoint: {self.checkpoint}; continue with: {resume_command}"
        return f"{' '.join(self.failure.summary().split())}. Not retried: {self.reason}. {after}"

    def __reduce__(self):
        return RunFailedError, (self.failure, self.reason, self.checkpoint, self.failures)
