"""A run that recovers by itself: retries after worker failures, bounds on hangs, stopping cleanly on a signal.

    policy.py      RetryPolicy: which failures are retried (the rule in one place) and RunFailedError
    journal.py     FailureJournal: failures.jsonl, the log and the progress line
    deadlines.py   StepDeadlines: how long a step or a save may take before it counts as hung
    signals.py     StopSignals: SIGTERM / SIGINT to the driver, the grace period, RunStopped

The driver (pipeline/driver.py) detects and attributes failures (pipeline/health.py) and restarts a single
stage where it can (pipeline/stage_restart.py); the run loop (run.py) restarts the whole pipeline otherwise.
"""

from lopt_dist.recovery.deadlines import StepDeadlines
from lopt_dist.recovery.journal import FailureJournal
from lopt_dist.recovery.policy import Decision, RetryPolicy, RunFailedError
from lopt_dist.recovery.signals import RunStopped, StopSignals

__all__ = ["Decision", "FailureJournal", "RetryPolicy", "RunFailedError", "RunStopped", "StepDeadlines",
           "StopSignals"]
