"""Waiting on workers: `wait_all` over labelled refs from any number of groups, first failure first.

A module function, so that the driver can wait on the workers of several groups at once and hear of the
first failure at once, instead of blocking on a healthy worker that waits for the broken one.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from lopt_dist.pipeline.errors import WorkerFailedError, WorkerTimeoutError


def wait_all(refs: Mapping[str, ray.ObjectRef], timeout_s: float | None = None) -> dict[str, Any]:
    """Wait for labelled refs, from any number of groups; return {label: result} in the order given.

    Raises WorkerFailedError as soon as any one ref fails, without waiting for the others (they may be blocked
    on the failed worker forever), and WorkerTimeoutError naming the unfinished labels after `timeout_s`. The
    other tasks keep running either way: shut their groups down to stop them.
    """
    label_of = {ref: label for label, ref in refs.items()}
    if len(label_of) != len(refs):
        raise ValueError("wait_all: the same ObjectRef appears under two labels")
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    results: dict[str, Any] = {}
    while label_of:
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _ = ray.wait(list(label_of), num_returns=1, timeout=remaining)
        if not ready:
            raise WorkerTimeoutError(list(label_of.values()), timeout_s)
        for ref in ready:
            label = label_of.pop(ref)
            results[label] = get_result(label, ref)
    return {label: results[label] for label in refs}


def get_result(label: str, ref: ray.ObjectRef) -> Any:
    """The result of one ready ref; WorkerFailedError naming `label` when the call raised or the worker died."""
    try:
        return ray.get(ref)
    except RayTaskError as err:  # the method raised; checked first, since it may also subclass RayActorError
        error = f"{type(err.cause).__name__}: {err.cause}"
        raise WorkerFailedError(label, error, _plain(str(err))) from err
    except RayActorError as err:  # the worker's process died: os._exit, the OOM killer, a lost node, ray.kill
        first_line, _, rest = _plain(str(err)).strip().partition("\n")
        raise WorkerFailedError(label, first_line, rest, died=True) from err
    except RayError as err:  # e.g. the result was lost with its node
        raise WorkerFailedError(label, f"{type(err).__name__}: {err}") from err


def _plain(text: str) -> str:
    # Ray colours the remote task's name for terminals; the text also goes to log files.
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
