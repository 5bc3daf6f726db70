"""When a step fails or hangs: ask every worker what it is doing, and blame the worker that failed first.

A worker's death makes its neighbours fail too ("connection closed by peer", a collective that never returns),
and their errors can reach the driver before Ray reports the death. So on any failure the driver probes every
worker (`status`, answered on the worker's control thread while its step blocks) and blames, in this order:
1. a worker that is dead;
2. one that does not answer the probe (a stopped or frozen process, a lost node);
3. one that raised something other than a lost peer (PeerLostError, a broken connection);
4. in a hang, one busy with its own work (the data, a forward, a checkpoint write) rather than waiting on a peer;
5. one that lost a peer; else the first worker that has not finished.
Within a rule, the worker whose error reached the driver first, then the first in stage order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError

from lopt_dist.errors import caused_by_user
from lopt_dist.pipeline.activity import WorkerStatus
from lopt_dist.pipeline.errors import Failure, WorkerFailedError
from lopt_dist.pipeline.futures import get_result
from lopt_dist.pipeline.group import WorkerGroup

# What a worker raises when the failure was elsewhere: our channel's error, gloo's and the store's words for it.
_PEER_ERROR = re.compile(r"PeerLostError|Connection closed by peer|Connection reset by peer|Broken pipe|"
                         r"Socket Timeout|timed out|Timed out", re.IGNORECASE)


@dataclass(frozen=True)
class Call:
    """One call the driver queued on one worker, in the order it queued them."""

    label: str
    phase: str  # "train_step", "save_checkpoint", "load_checkpoint", "start-up"
    step: int | None  # the step trained, or the step of the state saved or loaded
    ref: ray.ObjectRef


@dataclass(frozen=True)
class Probe:
    state: str  # "alive", "dead" or "no answer"
    status: WorkerStatus | None = None
    error: str = ""

    def describe(self) -> str:
        if self.state == "alive":
            return self.status.describe()
        return "dead" if self.state == "dead" else "no answer to a status probe"


def probe(groups: Sequence[WorkerGroup], timeout_s: float) -> dict[str, Probe]:
    """Every worker's status, waiting at most `timeout_s` for all of them together."""
    refs = {}
    for group in groups:
        refs.update(group.label_refs(group.execute_async("status")))
    ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    ready = set(ray.wait(list(refs.values()), num_returns=len(refs), timeout=0)[0])
    probes = {}
    for label, ref in refs.items():
        if ref not in ready:
            probes[label] = Probe("no answer")
            continue
        try:
            probes[label] = Probe("alive", ray.get(ref))
        except RayActorError as err:
            probes[label] = Probe("dead", error=str(err).strip().splitlines()[0])
        except Exception as err:  # e.g. an older worker without `status`: treat as not answering
            probes[label] = Probe("no answer", error=f"{type(err).__name__}: {err}")
    return probes


@dataclass(frozen=True)
class Where:
    """What the driver knows of a worker without asking it: its stage, node and process."""

    stage: int
    node: str
    pid: int | None


@dataclass(frozen=True)
class Diagnosis:
    failure: Failure  # blamed on the worker that failed first
    error: WorkerFailedError | None  # that worker's error, if it raised or died
    probes: dict[str, Probe]  # every worker's answer to the status probe
    failed: frozenset[str]  # the workers with a call that failed


def diagnose(groups: Sequence[WorkerGroup], calls: Sequence[Call], where: dict[str, Where], timeout_s: float,
             trigger: WorkerFailedError | None = None, bound_s: float | None = None) -> Diagnosis:
    """Probe every worker and blame the one that failed first. `calls`: every call not yet collected, in the
    order queued; `trigger`: the error that reached the driver (None for a hang: a wait that outran `bound_s`)."""
    calls = list({c.ref: c for c in calls}.values())  # a call may be listed twice (awaited and in the background)
    probes = probe(groups, timeout_s)
    failed = _first_failures(calls)
    if trigger is not None:
        failed.setdefault(trigger.label, (None, trigger))
    pending = _first_pending(calls)
    order = [trigger.label] if trigger is not None else []
    order += [label for label in where if label not in order]

    def pick(rule) -> str | None:
        return next((label for label in order if rule(label)), None)

    culprit = (
        pick(lambda w: probes[w].state == "dead" or (w in failed and failed[w][1].died))
        or pick(lambda w: probes[w].state == "no answer")
        or pick(lambda w: w in failed and not _PEER_ERROR.search(failed[w][1].error))
        or pick(lambda w: w in pending and probes[w].state == "alive" and not probes[w].status.waits_on_peer)
        or pick(lambda w: w in failed)
        or pick(lambda w: w in pending)
        or order[0]
    )
    failure, error = _failure(culprit, probes, failed, pending, where, timeout_s, bound_s)
    return Diagnosis(failure, error, probes, frozenset(failed))


def _failure(culprit: str, probes: dict[str, Probe], failed: dict, pending: dict[str, Call],
             where: dict[str, Where], timeout_s: float,
             bound_s: float | None) -> tuple[Failure, WorkerFailedError | None]:
    call, error = failed.get(culprit, (None, None))
    call = call or pending.get(culprit)
    probe_ = probes[culprit]
    place = where[culprit]
    if probe_.state == "dead" or (error is not None and error.died):
        kind, cause = "died", (error.error if error is not None else probe_.error)
    elif probe_.state == "no answer":
        kind = "unresponsive"
        cause = (f"no answer to a status probe within {timeout_s:g} s (a stopped or frozen process, or a lost "
                 "node)") + (f", after the wait outran its bound of {bound_s:g} s" if bound_s else "")
    elif error is not None:
        kind, cause = "raised", error.error
    else:
        kind = "hung"
        cause = f"{probe_.status.doing} for {probe_.status.for_s:.0f} s" + (
            f" (the bound is {bound_s:g} s)" if bound_s else "")
    step = call.step if call is not None else (probe_.status.step if probe_.status else None)
    pid = probe_.status.pid if probe_.status is not None else place.pid
    others = {}
    for label, other in probes.items():
        if label != culprit:
            others[label] = other.describe() + (f"; raised {failed[label][1].error}" if label in failed else "")
    failure = Failure(worker=culprit, kind=kind, cause=" ".join(cause.split()),
                      phase=call.phase if call is not None else "train_step", step=step, stage=place.stage,
                      node=place.node, pid=pid,
                      details=error.details if error is not None else "", others=others,
                      user_error=error is not None and caused_by_user(error))
    return failure, error


def _first_failures(calls: Sequence[Call]) -> dict[str, tuple[Call, WorkerFailedError]]:
    """Each worker's first call, in queue order, that has failed already."""
    done = set(ray.wait([c.ref for c in calls], num_returns=len(calls), timeout=0)[0]) if calls else set()
    failed: dict[str, tuple[Call, WorkerFailedError]] = {}
    for call in calls:
        if call.label in failed or call.ref not in done:
            continue
        try:
            get_result(call.label, call.ref)
        except WorkerFailedError as err:
            failed[call.label] = (call, err)
    return failed


def _first_pending(calls: Sequence[Call]) -> dict[str, Call]:
    """Each worker's first call, in queue order, that has not finished: what it was running."""
    done = set(ray.wait([c.ref for c in calls], num_returns=len(calls), timeout=0)[0]) if calls else set()
    pending: dict[str, Call] = {}
    for call in calls:
        if call.ref not in done:
            pending.setdefault(call.label, call)
    return pending
