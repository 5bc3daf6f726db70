"""The driver side of the decoupled pipeline: one worker group per stage, started, stepped and stopped together.

The driver queues every worker's `train_step` calls in order (Ray runs one actor's calls one after another)
and collects step k from all workers while later steps already run, so it never holds the pipeline back. A
worker that raises, dies or hangs (a step or save outrunning its bound, recovery/deadlines.py) fails the step at
once, blamed on the worker that failed first (pipeline/health.py); the run loop decides what happens next.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ray
import torch

from lopt_dist.checkpoint.safetensors_io import Shard
from lopt_dist.config import ExperimentConfig
from lopt_dist.evaluation import eval_record, set_names
from lopt_dist.pipeline.deepspeed_engine import deepspeed_config
from lopt_dist.pipeline.errors import Failure, PipelineFailure, WorkerFailedError
from lopt_dist.pipeline.futures import get_result, wait_all
from lopt_dist.pipeline.group import WorkerGroup
from lopt_dist.pipeline.health import Call, Where, diagnose, probe
# Launching lives in launch.py; these names are imported from here by older callers.
from lopt_dist.pipeline.launch import Launched, connect_ray, launch_pipeline, relaunch_stage, wait_for_ray  # noqa: F401
from lopt_dist.pipeline.stage_restart import RestartPlan, clear_stage_files, plan_restart
from lopt_dist.pipeline.stage_worker import BoundaryAddress, StageWorker, WorkerEvalStats, WorkerStepStats
from lopt_dist.recovery.deadlines import StepDeadlines
from lopt_dist.recovery.signals import GraceExpired, StopSignals
from lopt_dist.telemetry.memory import step_peak_bytes

logger = logging.getLogger(__name__)

_STEPS_QUEUED_AHEAD = 2


@dataclass
class StepReport:
    step: int
    workers: list[WorkerStepStats]  # every worker of every stage, stage-major
    checkpoint: Path | None = None  # staged checkpoint of the state after this step, to commit
    evaluation: list[WorkerEvalStats] | None = None  # when the run evaluated after this step


@dataclass
class _Queued:
    """A step queued on every worker, and the evaluation and checkpoint save queued right behind it (if any)."""

    step: int
    train: list[Call]
    evaluate: list[Call]
    save: list[Call]
    directory: Path | None

    def calls(self) -> list[Call]:
        return self.train + self.evaluate + self.save


class Recovery(Protocol):
    """What the driver asks the run before it restarts a stage alone (run.py implements it)."""

    def latest(self) -> tuple[Path, int] | None:
        """The newest committed checkpoint and its step."""

    def admit(self, failure: Failure, action: str) -> None:
        """Count and record the failure and the action; raises when the run must stop instead."""


class PipelineDriver:
    def __init__(self, cfg: ExperimentConfig, launched: Launched, worker_cls: type[StageWorker] = StageWorker,
                 extra_init_args: tuple = (), setup_times: dict[str, float] | None = None) -> None:
        self.cfg = cfg
        self.setup_times = setup_times or {}  # what `start` spent its time on, for the run's set-up line
        self.launched = launched
        self.groups = launched.groups
        self.worker_cls, self.extra_init_args = worker_cls, extra_init_args
        self.deadlines = StepDeadlines(cfg.runtime)
        self.where: dict[str, Where] = {}  # each worker's stage, node and pid, for failure reports
        self.ds_configs: list[dict] = []
        self.addresses: list[BoundaryAddress] = []  # where each boundary's group rendezvoused last
        self._recent: dict[int, dict[str, WorkerStepStats]] = {}  # steps since the last checkpoint, by worker
        self._background: list[Call] = []  # calls whose failure must stop the run, but whose end nobody awaits

    @classmethod
    def start(cls, cfg: ExperimentConfig, worker_cls: type[StageWorker] = StageWorker,
              extra_init_args: tuple = ()) -> PipelineDriver:
        """Start one group per stage, wire the boundaries and build every engine.

        `worker_cls` / `extra_init_args`: a `StageWorker` subclass and what its constructor takes after
        `(cfg, stage_index)` (the benchmark's instrumented worker uses this). A worker that fails while setting
        up raises PipelineFailure (phase "start-up"), blamed like a failure in a step.
        """
        ds_configs = [deepspeed_config(cfg, i) for i in range(len(cfg.runtime.groups))]
        clock = time.perf_counter()
        connect_ray(cfg)
        clock = time.perf_counter()
        connect_ray(cfg)
        times = {"Ray start": time.perf_counter() - clock}
        launched = launch_pipeline(cfg, worker_cls, extra_init_args)
        times["workers"] = time.perf_counter() - clock - times["Ray start"]
        driver = cls(cfg, launched, worker_cls, extra_init_args, times)
        try:
            driver._locate(probe_pids=False)
            driver._setup(ds_configs)
            driver._locate(probe_pids=True)
        except BaseException:
            driver.shutdown()
            raise
        times["loading and engines"] = time.perf_counter() - clock - sum(times.values())
        return driver

    def _setup(self, ds_configs: list[dict]) -> None:
        groups = self.groups
        # Boundary b's store lives on stage b's worker 0, on a port it holds open on its node's address.
        self.ds_configs = ds_configs
        self.addresses = [BoundaryAddress(g.master_addr, g.execute_single(0, "_reserve_port"), backend)
                          for g, backend in zip(groups[:-1], self.launched.boundary_backends)]
        calls = []
        for group, backend, ds in zip(groups, self.launched.group_backends, ds_configs):
            refs = group.execute_async("setup", group.master_addr, group.master_port, self.addresses, backend, ds)
            calls += _calls_of(group, refs, "start-up", None)
        self._collect(calls, self.cfg.runtime.boundary_timeout_s)

    def _locate(self, probe_pids: bool) -> None:
        """Note each worker's stage, node and (once set up) pid: a dead worker can no longer say where it ran."""
        probes = probe(self.groups, self.cfg.runtime.health_timeout_s) if probe_pids else {}
        for stage, group in enumerate(self.groups):
            for rank, info in enumerate(group.rank_infos):
                label = group.label(rank)
                status = probes[label].status if label in probes else None
                self.where[label] = Where(stage, info.node_ip, status.pid if status is not None else None)
        if probe_pids:
            logger.info("workers: %s", "; ".join(f"{label} on {w.node} pid {w.pid}" for label, w in self.where.items()))

    def _calls(self, method: str, phase: str, step: int | None, *args, groups=None) -> list[Call]:
        calls = []
        for group in self.groups if groups is None else groups:
            calls += _calls_of(group, group.execute_async(method, *args), phase, step)
        return calls

    def _all(self, method: str, *args) -> dict[str, ray.ObjectRef]:
        refs = {}
        for group in self.groups:
            refs.update(group.label_refs(group.execute_async(method, *args)))
        return refs

    # ---- the step loop ----

    def steps(self, first: int, last: int, checkpoint_at: Callable[[int], Path | None],
              stop: StopSignals | None = None, recovery: Recovery | None = None,
              evaluate_at: Callable[[int], bool] = lambda done: False) -> Iterator[StepReport]:
        """Run steps [first, last); yield each step's report as soon as every worker has finished it.

        `checkpoint_at(n)` returns a staging directory when the state after n completed steps must be saved;
        the save is queued on every worker right behind that step, so each saves exactly that state (the caller
        commits it before asking for the next report). A step or save that fails or outruns its bound
        (recovery/deadlines.py) is blamed on the worker that failed first (pipeline/health.py); with `recovery`,
        the failed stage restarts alone where that stays exact (pipeline/stage_restart.py), else PipelineFailure
        is raised. `evaluate_at(n)`: whether to evaluate the state after n completed steps, queued on every worker
        between that step and its save (`evaluate`). Once `stop` is requested no further step is queued: the loop ends after the steps already
        queued, or raises GraceExpired when they outrun the stop's grace period.
        """
        queued: deque[_Queued] = deque()
        next_step = first
        self.deadlines.restart()
        self.deadlines.waiting()
        while True:
            # Keep a few steps queued so that no worker ever idles waiting for the driver.
            while next_step < last and len(queued) < _STEPS_QUEUED_AHEAD and not (stop and stop.requested):
                queued.append(self._queue(next_step, checkpoint_at(next_step + 1), evaluate_at(next_step + 1)))
                next_step += 1
            if not queued:
                return
            entry = queued[0]
            later = [c for q in list(queued)[1:] for c in q.calls()]
            try:
                results = self._collect(entry.train, self.deadlines.step_bound(), stop,
                                        also=entry.evaluate + entry.save + later)
                self.deadlines.step_done()
                # An evaluation is bounded like a save: runtime.save_timeout_s.
                evaluation = self._collect(entry.evaluate, self.deadlines.save_bound(), stop, also=entry.save + later)
                if entry.save:
                    self._collect(entry.save, self.deadlines.save_bound(), stop, also=later)
            except PipelineFailure as failure:
                if not self._restart_stage(failure, queued, stop, recovery):
                    raise
                continue  # the same step, with the restarted stage's calls
            queued.popleft()
            workers = [results[c] for c in entry.train]
            self._recent[entry.step] = {c.label: w for c, w in zip(entry.train, workers)}
            yield StepReport(entry.step, workers, entry.directory, [evaluation[c] for c in entry.evaluate] or None)
            if entry.directory is not None:  # the caller committed it
                self._committed(entry.step + 1)
            self.deadlines.waiting()

    def _queue(self, step: int, directory: Path | None, evaluate: bool, groups=None) -> _Queued:
        train = self._calls("train_step", "train_step", step, step, groups=groups)
        evaluation = self._calls("evaluate", "evaluate", step + 1, groups=groups) if evaluate else []
        save = self._calls("save_checkpoint", "save_checkpoint", step + 1, str(directory),
                           groups=groups) if directory else []
        return _Queued(step, train, evaluation, save, directory)

    def _committed(self, step: int) -> None:
        """The checkpoint of `step` is committed: no stage restarted alone goes back before it."""
        self._recent = {s: w for s, w in self._recent.items() if s >= step}
        self._background += self._calls("trim_replay", "train_step", step, step, groups=self.groups[:-1])

    def _collect(self, calls: list[Call], bound_s: float, stop: StopSignals | None = None,
                 also: list[Call] = ()) -> dict[Call, Any]:
        """Wait for `calls`, at most `bound_s`; {call: result}. On a failure or a hang, probe every worker and
        raise PipelineFailure blaming the one that failed first (`also`: the calls queued behind these, which
        show where a worker that ran ahead failed). Background calls that fail count too. Waits in slices of a
        second, so that a stop signal's grace period is kept to the second."""
        deadline = time.monotonic() + bound_s
        waiting = {c.ref: c for c in calls}
        results: dict[Call, Any] = {}
        while waiting:
            now = time.monotonic()
            if stop is not None and stop.deadline is not None and now >= stop.deadline:
                raise GraceExpired(f"waiting on {', '.join(c.label for c in waiting.values())}")
            if now >= deadline:
                self._fail([*waiting.values(), *also, *self._background], None, bound_s)
            watched = {**{c.ref: c for c in self._background}, **waiting}
            ready, _ = ray.wait(list(watched), num_returns=1, timeout=min(1.0, deadline - now))
            for ref in ready:
                call = watched[ref]
                try:
                    result = get_result(call.label, ref)
                except WorkerFailedError as err:
                    self._fail([call, *waiting.values(), *also, *self._background], err, None)
                if waiting.pop(ref, None) is not None:
                    results[call] = result
                else:
                    self._background.remove(call)
        return results

    def _fail(self, calls: list[Call], trigger: WorkerFailedError | None, bound_s: float | None) -> None:
        diagnosis = diagnose(self.groups, calls, self.where, self.cfg.runtime.health_timeout_s, trigger, bound_s)
        raise PipelineFailure(diagnosis.failure, diagnosis) from (diagnosis.error or trigger)

    # ---- restarting one stage (pipeline/stage_restart.py) ----

    def _restart_stage(self, failure: PipelineFailure, queued: deque[_Queued], stop: StopSignals | None,
                       recovery: Recovery | None) -> bool:
        """Restart the failed stage alone if that stays exact (False: every stage must restart)."""
        if recovery is None or failure.diagnosis is None or (stop is not None and stop.requested):
            return False
        stages = {label: where.stage for label, where in self.where.items()}
        plan = plan_restart(self.cfg, failure.diagnosis, stages, recovery.latest())
        if isinstance(plan, str):
            failure.failure.notes.append(f"not restarted alone: {plan}")
            return False
        recovery.admit(failure.failure, plan.action())  # raises when the run must stop
        try:
            self._relaunch(plan, queued)
        except Exception as err:
            cause = f"restarting stage {plan.stage} alone failed: {type(err).__name__}: {' '.join(str(err).split())}"
            raise PipelineFailure(Failure(worker=f"stage {plan.stage}", kind="raised", cause=cause[:2000],
                                          phase="start-up", step=plan.step, stage=plan.stage)) from err
        return True

    def _relaunch(self, plan: RestartPlan, queued: deque[_Queued]) -> None:
        """Kill the stage's group, start a new one from the plan's checkpoint, join it to its neighbours, and
        queue on it the steps it lost and the steps the others have queued."""
        s, runtime = plan.stage, self.cfg.runtime
        lost = {self.groups[s].label(rank) for rank in range(len(self.groups[s]))}
        self._background = [c for c in self._background if c.label not in lost]  # they die with the group
        took = {"start": time.monotonic()}
        self.groups[s].shutdown()
        group = relaunch_stage(self.cfg, self.launched, s, self.worker_cls, self.extra_init_args)
        took["group"] = time.monotonic()
        backends = self.launched.boundary_backends
        calls = []
        if s > 0:  # boundary s-1's store stays on stage s-1's worker 0 (a survivor, answering on its control thread)
            port = wait_all({"port": self.groups[s - 1].execute_single_async(0, "reserve_boundary_port")},
                            runtime.health_timeout_s)["port"]
            self.addresses[s - 1] = BoundaryAddress(self.groups[s - 1].master_addr, port, backends[s - 1])
            calls += _calls_of(self.groups[s - 1], self.groups[s - 1].execute_async(
                "rejoin_boundary", s - 1, self.addresses[s - 1]), "start-up", None)
        if s < len(self.groups) - 1:
            self.addresses[s] = BoundaryAddress(group.master_addr, group.execute_single(0, "_reserve_port"),
                                                backends[s])
            calls += _calls_of(self.groups[s + 1], self.groups[s + 1].execute_async(
                "rejoin_boundary", s, self.addresses[s]), "start-up", None)
        setup = group.execute_async("setup", group.master_addr, group.master_port, self.addresses,
                                    self.launched.group_backends[s], self.ds_configs[s], first_step=plan.step)
        self._collect(_calls_of(group, setup, "start-up", None) + calls, runtime.boundary_timeout_s)
        took["set-up"] = time.monotonic()
        if plan.checkpoint is not None:
            loads = _calls_of(group, group.execute_async("load_checkpoint", str(plan.checkpoint)), "load_checkpoint",
                              plan.step)
            self._collect(loads, self.deadlines.save_bound())
        took["load"] = time.monotonic()
        self._locate(probe_pids=True)
        first_queued = queued[0].step
        redo = [c for step in range(plan.step, first_queued)
                for c in self._calls("train_step", "train_step", step, step, groups=[group])]
        for entry in queued:
            if entry.directory is not None:
                clear_stage_files(entry.directory, s)
            new = self._queue(entry.step, entry.directory, bool(entry.evaluate), groups=[group])
            entry.train, entry.save = _replace(entry.train, new.train), _replace(entry.save, new.save)
            entry.evaluate = _replace(entry.evaluate, new.evaluate)
        if s > 0:
            self._background += self._calls("resend", "train_step", first_queued, groups=[self.groups[s - 1]])
        self.deadlines.restart(catch_up_steps=first_queued - plan.step)
        self._check_redone(redo, self._collect(redo, self.deadlines.step_bound(), also=[c for q in queued
                                                                                       for c in q.calls()]))
        took["redo"] = time.monotonic()
        self.deadlines.restart()
        marks = list(took.items())
        logger.info("stage %d restarted alone from step %d in %.1f s (%s)", s, plan.step, marks[-1][1] - marks[0][1],
                    ", ".join(f"{name} {t - before:.1f} s" for (_, before), (name, t) in zip(marks, marks[1:])))

    def _check_redone(self, redo: list[Call], results: dict[Call, WorkerStepStats]) -> None:
        """The restarted stage redid steps whose records exist: its losses must be the ones recorded."""
        for call in redo:
            before, now = self._recent.get(call.step, {}).get(call.label), results[call]
            if before is not None and (before.loss_sum, before.tokens) != (now.loss_sum, now.tokens):
                logger.warning("%s redid step %d with loss sum %r (first time: %r): the restarted stage does not "
                               "reproduce its lost state exactly (non-deterministic kernels?)", call.label, call.step,
                               now.loss_sum, before.loss_sum)

    # ---- checkpoints and export ----

    def save_checkpoint(self, directory: str, step: int | None = None, bound_s: float | None = None,
                        stop: StopSignals | None = None) -> None:
        """Every worker saves its part of the state (after `step` steps) into `directory`, within `bound_s`
        (default runtime.save_timeout_s) and the grace period of `stop`."""
        calls = self._calls("save_checkpoint", "save_checkpoint", step, directory)
        self._collect(calls, bound_s if bound_s is not None else self.deadlines.save_bound(), stop)

    def load_checkpoint(self, directory: str, step: int | None = None) -> None:
        calls = self._calls("load_checkpoint", "load_checkpoint", step, directory)
        self._collect(calls, self.deadlines.save_bound())

    def export_shards(self, directory: Path, max_bytes: int, dtype: torch.dtype) -> list[Shard]:
        """Every stage writes its part of the final model into `directory`; their shards' metadata, stage by stage.

        The weights stay in the workers: only names and sizes come back here.
        """
        results = wait_all(self._all("export_shards", str(directory), max_bytes, dtype))
        return [shard for shards in results.values() if shards is not None for shard in shards]

    def stage_weights(self) -> list[dict[str, torch.Tensor]]:
        """Every stage's fp32 weights, gathered here (tests and small models only: the run exports with
        `export_shards`)."""
        results = wait_all(self._all("stage_weights"))
        return [w for w in results.values() if w is not None]

    def shutdown(self) -> None:
        """Kill every worker and release the reservation, waiting at most runtime.health_timeout_s: with its node's
        raylet gone (a lost node, or a signal that took an embedded Ray down with the driver) Ray's calls never
        return, and a run that is stopping or restarting must not hang on them."""
        closer = threading.Thread(target=self.launched.shutdown, name="pipeline-shutdown", daemon=True)
        closer.start()
        closer.join(self.cfg.runtime.health_timeout_s)
        if closer.is_alive():
            logger.warning("the workers did not confirm their shutdown within %g s (runtime.health_timeout_s); "
                           "going on without", self.cfg.runtime.health_timeout_s)
        self.groups = []


def _calls_of(group: WorkerGroup, refs: list[ray.ObjectRef], phase: str, step: int | None) -> list[Call]:
    return [Call(label, phase, step, ref) for label, ref in group.label_refs(refs).items()]


def _replace(calls: list[Call], new: list[Call]) -> list[Call]:
    """`calls` with those of the workers in `new` replaced, in the same (stage-major) order."""
    by_label = {c.label: c for c in new}
    return [by_label.get(c.label, c) for c in calls]


def summarize_step(report: StepReport, cfg: ExperimentConfig, wall_s: float) -> dict[str, Any]:
    """One metrics record: losses over all micro-batches of the step, and each worker's time split."""
    per_step = cfg.train.micro_batches_per_step
    record: dict[str, Any] = {"step": report.step, "step_seconds": wall_s}
    last = len(cfg.runtime.groups) - 1
    for stage in range(last + 1):
        loss = sum(w.loss_sum for w in report.workers if w.stage == stage) / per_step
        record["task_loss" if stage == last else f"recon_loss_{stage}"] = loss
        router = [w.router_aux_sum for w in report.workers if w.stage == stage]
        if any(r is not None for r in router):  # MoE families
            record[f"router_aux_loss_{stage}"] = sum(r for r in router if r is not None) / per_step
        first = next(w for w in report.workers if w.stage == stage)  # the group's workers agree on both
        record[f"lr_{stage}"], record[f"grad_norm_{stage}"] = first.lr, first.grad_norm
    record["tokens"] = sum(w.tokens for w in report.workers if w.stage == 0)
    record["tokens_per_s"] = record["tokens"] / max(wall_s, 1e-9)
    for w in report.workers:
        key = f"s{w.stage}w{w.rank}"
        record[f"{key}_busy_frac"] = w.busy_s / max(w.wall_s, 1e-9)
        record[f"{key}_recv_wait_s"] = w.recv_wait_s
        record[f"{key}_send_wait_s"] = w.send_wait_s
        record[f"{key}_bytes_sent"] = w.bytes_sent
        record[f"{key}_max_depth"] = w.max_outstanding
        record[f"{key}_peak_mem_bytes"] = step_peak_bytes(w.memory)
    record["channel_depth"] = max((w.max_outstanding for w in report.workers), default=0)
    if report.evaluation:
        record.update(summarize_evaluation(report.evaluation, cfg))
    return record


def summarize_evaluation(workers: list[WorkerEvalStats], cfg: ExperimentConfig) -> dict[str, Any]:
    """The evaluation's record fields (lopt_dist/evaluation.py) from every worker's sums, and its wall time."""
    stages = len(cfg.runtime.groups)
    sums = {name: [sum(w.sums[name] for w in workers if w.stage == s) for s in range(stages)]
            for name in set_names(cfg)}
    return {**eval_record(sums, cfg), "eval_seconds": max(w.wall_s for w in workers)}
