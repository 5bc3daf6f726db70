"""Which failures a run retries, how long a step may take before it is hung, and what the CLI says on giving up."""

from __future__ import annotations

from pathlib import Path

import pytest

from lopt_dist.cli import resume_command, train_parser
from lopt_dist.config import load_config
from lopt_dist.pipeline.errors import Failure
from lopt_dist.recovery import RetryPolicy, RunFailedError, StepDeadlines


def _failure(worker="stage 1 worker 0", step=5, phase="train_step", user_error=False) -> Failure:
    return Failure(worker=worker, kind="died", cause="The actor died unexpectedly", phase=phase, step=step, stage=1,
                   node="10.0.0.2", pid=4242, user_error=user_error)


def test_failures_are_retried_up_to_max_failures():
    policy = RetryPolicy(max_failures=2)
    assert policy.decide(_failure(step=3), started=True).retry
    assert policy.decide(_failure(worker="stage 0 worker 0", step=3), started=True).retry
    decision = policy.decide(_failure(step=7), started=True)
    assert not decision.retry and "failure 3 of this run, and runtime.max_failures is 2" in decision.reason


@pytest.mark.parametrize(("failures", "reason"), [
    ([_failure(user_error=True)], "user error"),
    ([_failure(), _failure()], "failed in step 5 before"),
    ([_failure(phase="save_checkpoint", step=6)] * 2, "failed in saving the checkpoint of step 6 before"),
])
def test_user_errors_and_failures_that_repeat_in_place_are_not_retried(failures, reason):
    policy = RetryPolicy(max_failures=5)
    decisions = [policy.decide(f, started=True) for f in failures]
    assert [d.retry for d in decisions] == [False] if len(failures) == 1 else [True, False]
    assert reason in decisions[-1].reason


def test_fail_fast_and_failures_before_any_step_are_not_retried():
    assert "max_failures is 0" in RetryPolicy(0).decide(_failure(), started=True).reason
    assert "before its first step" in RetryPolicy(3).decide(_failure(step=None, phase="start-up"), started=False).reason


def test_given_up_message_is_one_line_naming_the_checkpoint_and_the_resume_command():
    args = train_parser().parse_args(["configs/x.yaml", "--set", "train.steps=20", "--set", "output_dir=runs/a b",
                                      "--overwrite"])
    command = resume_command(args)
    assert command == "lopt-train configs/x.yaml --set train.steps=20 --set 'output_dir=runs/a b' --resume"
    err = RunFailedError(_failure(), "runtime.max_failures is 0 (fail fast)", Path("runs/a b/checkpoints/step_000004"), 1)
    line = err.one_line(command)
    assert "\n" not in line
    assert line == ("stage 1 worker 0 died: The actor died unexpectedly (in step 5, node 10.0.0.2, pid 4242). Not "
                    "retried: runtime.max_failures is 0 (fail fast). Last committed checkpoint: "
                    f"runs/a b/checkpoints/step_000004; continue with: {command}")
    assert "No checkpoint was committed: run it again from the start" in RunFailedError(_failure(), "x", None, 1).one_line(command)


def test_step_bound_is_generous_first_then_a_multiple_of_the_median_with_a_floor():
    runtime = load_config(None, ["runtime.step_timeout_min_s=2", "runtime.step_timeout_factor=4",
                                 "runtime.first_step_timeout_s=100"]).runtime
    deadlines = StepDeadlines(runtime)
    deadlines.restart()
    assert deadlines.step_bound() == 100
    for took in (0.0, 0.2, 1.0, 1.0, 1.0):  # the first (warm-up) is left out of the median
        deadlines.waiting()
        deadlines._since -= took  # as if the step had taken `took` seconds
        deadlines.step_done()
    assert deadlines.step_bound() == pytest.approx(4.0, abs=0.05)  # 4 x median(0.2, 1, 1, 1)
    deadlines.restart(catch_up_steps=3)  # a restarted stage redoes 3 steps before the awaited one
    assert deadlines.step_bound() == pytest.approx(100 + 3 * 4.0, abs=0.2)
    fast = StepDeadlines(runtime)
    fast.restart()
    for _ in range(3):
        fast.waiting()
        fast.step_done()
    assert fast.step_bound() == 2  # the floor
