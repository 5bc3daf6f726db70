"""The driver side of the decoupled pipeline: one worker group per stage, started, stepped and stopped together.

The driver queues every worker's `train_step` calls in order (Ray runs one actor's calls one after another)
and collects step k from all workers while later steps already run, so it never holds the pipeline back. A
worker that raises, dies or hangs (a step or save outrunning its bound, recovery/deadlines.py) fails the step at
once, blamed on the worker that failed first (pipeline/health.py); the run loop decides what happens next.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import AuthenticationError

from lopt_dist.checkpoint.safetensors_io import Shard
from lopt_dist.config import ConfigError, ExperimentConfig
from lopt_dist.device import Slot, boundary_backend, cluster_uses_gpus, device_views, group_backend
from lopt_dist.pipeline.deepspeed_engine import deepspeed_config
from lopt_dist.pipeline.errors import PipelineFailure, WorkerFailedError
from lopt_dist.pipeline.futures import get_result, wait_all
from lopt_dist.pipeline.group import WorkerGroup
from lopt_dist.pipeline.health import Call, Where, diagnose, probe
from lopt_dist.pipeline.placement import GroupRequest, Placement, reserve
from lopt_dist.pipeline.stage_worker import BoundaryAddress, StageWorker, WorkerStepStats
from lopt_dist.recovery.deadlines import StepDeadlines
from lopt_dist.recovery.signals import GraceExpired, StopSignals
from lopt_dist.telemetry.memory import step_peak_bytes

logger = logging.getLogger(__name__)

_STEPS_QUEUED_AHEAD = 2


def connect_ray(cfg: ExperimentConfig) -> None:
    """Attach to `runtime.ray_address` / RAY_ADDRESS when given, else start an embedded local instance.

    The embedded instance is always a new one (`address="local"`): without it, `ray.init` would join whatever
    cluster was last started on this machine with `ray start`, possibly someone else's.
    """
    if ray.is_initialized():
        return
    key, address = ("runtime.ray_address", cfg.runtime.ray_address) if cfg.runtime.ray_address else (
        "RAY_ADDRESS", os.environ.get("RAY_ADDRESS"))
    if not address or address == "local":
        ray.init(address="local", num_cpus=cfg.runtime.ray_num_cpus, include_dashboard=False)
        return
    if address != "auto":  # "auto" finds a cluster on this machine, or fails at once
        wait_for_ray(address, key, cfg.runtime.start_timeout_s)
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, ValueError, AuthenticationError) as err:
        reason = " ".join(str(err).split())
        raise ConfigError(f"{key}: cannot attach to the Ray cluster at {address}: {reason}") from None


def wait_for_ray(address: str, key: str, timeout_s: float) -> None:
    """Wait until something accepts connections at `address` (host:port, or ray://host:port), for at most
    `timeout_s`; ConfigError naming `key` after that. Ray's own client would retry for ten minutes or more."""
    host, port = _host_port(address, key)
    deadline = time.monotonic() + timeout_s
    for attempt in itertools.count():
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except OSError as err:
            reason = err.strerror or str(err) or type(err).__name__
            if time.monotonic() + 1.0 >= deadline:
                raise ConfigError(
                    f"{key}: nothing answers at {address} ({reason}) after {timeout_s:g} s "
                    "(runtime.start_timeout_s); start the cluster (ray start --head) or fix the address, or leave "
                    "runtime.ray_address and RAY_ADDRESS unset for an embedded local Ray"
                ) from None
            if attempt == 0:
                logger.info("waiting for Ray at %s (%s), up to runtime.start_timeout_s=%g s", address, reason,
                            timeout_s)
            time.sleep(1.0)


def _host_port(address: str, key: str) -> tuple[str, int]:
    if address.startswith(("http://", "https://")):
        raise ConfigError(f"{key}: {address} is a dashboard (job submission) address; attaching needs the head's "
                          "GCS address host:port (port 6379 by default), or submit with `ray job submit`")
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"{key}: {address!r} is not a Ray address; give host:port (the head's GCS port, "
                          "6379 by default), ray://host:port, auto, or local")
    return host.strip("[]"), int(port)


@dataclass
class Launched:
    """A pipeline's worker groups, started and placed, with the backends decided from where they landed."""

    groups: list[WorkerGroup]
    placement: Placement
    gpu: bool
    group_backends: list[str]  # each stage group's own (DeepSpeed) process group
    boundary_backends: list[str]  # boundary b, between stage b and stage b+1

    def shutdown(self) -> None:
        for group in self.groups:
            group.shutdown()
        self.placement.release()


def launch_pipeline(cfg: ExperimentConfig, worker_cls: type, extra_init_args: tuple = ()) -> Launched:
    """Reserve one placement group for all stages, start one group per stage, show each worker its device.

    The device decision (lopt_dist.device) is made from what Ray assigned each worker, as the worker reported
    it, never from this process's CUDA: the driver may run on a CPU-only head node.
    """
    runtime = cfg.runtime
    gpu = cluster_uses_gpus(runtime.device, ray.cluster_resources().get("GPU", 0))
    if runtime.transport == "nccl" and not gpu:
        raise ConfigError("runtime.transport: 'nccl' moves GPU tensors, but this run has no GPUs; use 'auto' or 'gloo'")
    gpus = runtime.gpus_per_worker if gpu else 0.0
    requests = [GroupRequest(f"stage {i}", g.workers, g.threads_per_worker, gpus) for i, g in enumerate(runtime.groups)]
    placement = reserve(requests, runtime.start_timeout_s, wait_for_gpus=gpu and runtime.device == "cuda")
    groups: list[WorkerGroup] = []
    try:
        for i, g in enumerate(runtime.groups):
            groups.append(WorkerGroup.create(
                worker_cls, g.workers, name=f"stage {i}", cpus_per_worker=g.threads_per_worker,
                gpus_per_worker=gpus, init_args=(cfg, i, *extra_init_args), start_timeout_s=runtime.start_timeout_s,
                placement=(placement, i),
            ))
        slots = [[r.slot(group.label(r.rank)) for r in group.rank_infos] for group in groups]
        group_backends = [group_backend(i, s) for i, s in enumerate(slots)]
        boundary_backends = [boundary_backend(b, runtime.transport, slots[b] + slots[b + 1])
                             for b in range(len(groups) - 1)]
        _show_devices(groups, slots)
    except BaseException:
        for group in groups:
            group.shutdown()
        placement.release()
        raise
    return Launched(groups, placement, gpu, group_backends, boundary_backends)


def _show_devices(groups: list[WorkerGroup], slots: list[list[Slot]]) -> None:
    """Each worker sees every pipeline GPU on its node (NCCL P2P to its peers), its own at its device index."""
    views = iter(device_views([s for group_slots in slots for s in group_slots]))
    refs = {}
    for group in groups:
        args = [(next(views),) for _ in range(len(group))]
        refs.update(group.label_refs(group.execute_per_rank_async("_set_device_view", args)))
    wait_all(refs)


@dataclass
class StepReport:
    step: int
    workers: list[WorkerStepStats]  # every worker of every stage, stage-major
    checkpoint: Path | None = None  # staged checkpoint of the state after this step, to commit


@dataclass
class _Queued:
    """A step queued on every worker, and the checkpoint save queued right behind it (if any)."""

    step: int
    train: list[Call]
    save: list[Call]
    directory: Path | None

    def calls(self) -> list[Call]:
        return self.train + self.save


class PipelineDriver:
    def __init__(self, cfg: ExperimentConfig, launched: Launched) -> None:
        self.cfg = cfg
        self.launched = launched
        self.groups = launched.groups
        self.deadlines = StepDeadlines(cfg.runtime)
        self.where: dict[str, Where] = {}  # each worker's stage, node and pid, for failure reports

    @classmethod
    def start(cls, cfg: ExperimentConfig, worker_cls: type[StageWorker] = StageWorker,
              extra_init_args: tuple = ()) -> PipelineDriver:
        """Start one group per stage, wire the boundaries and build every engine.

        `worker_cls` / `extra_init_args`: a `StageWorker` subclass and what its constructor takes after
        `(cfg, stage_index)` (the benchmark's instrumented worker uses this). A worker that fails while setting
        up raises PipelineFailure (phase "start-up"), blamed like a failure in a step.
        """
        ds_configs = [deepspeed_config(cfg, g, f"runtime.groups[{i}].deepspeed_config")
                      for i, g in enumerate(cfg.runtime.groups)]
        connect_ray(cfg)
        driver = cls(cfg, launch_pipeline(cfg, worker_cls, extra_init_args))
        try:
            driver._locate(probe_pids=False)
            driver._setup(ds_configs)
            driver._locate(probe_pids=True)
        except BaseException:
            driver.shutdown()
            raise
        return driver

    def _setup(self, ds_configs: list[dict]) -> None:
        groups = self.groups
        # Boundary b's store lives on stage b's worker 0, on a port it holds open on its node's address.
        addresses = [BoundaryAddress(g.master_addr, g.execute_single(0, "_reserve_port"), backend)
                     for g, backend in zip(groups[:-1], self.launched.boundary_backends)]
        calls = []
        for group, backend, ds in zip(groups, self.launched.group_backends, ds_configs):
            refs = group.execute_async("setup", group.master_addr, group.master_port, addresses, backend, ds)
            calls += [Call(label, "start-up", None, ref) for label, ref in group.label_refs(refs).items()]
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

    def _calls(self, method: str, phase: str, step: int | None, *args) -> list[Call]:
        calls = []
        for group in self.groups:
            refs = group.execute_async(method, *args)
            calls += [Call(label, phase, step, ref) for label, ref in group.label_refs(refs).items()]
        return calls

    def _all(self, method: str, *args) -> dict[str, ray.ObjectRef]:
        refs = {}
        for group in self.groups:
            refs.update(group.label_refs(group.execute_async(method, *args)))
        return refs

    # ---- the step loop ----

    def steps(self, first: int, last: int, checkpoint_at: Callable[[int], Path | None],
              stop: StopSignals | None = None) -> Iterator[StepReport]:
        """Run steps [first, last); yield each step's report as soon as every worker has finished it.

        `checkpoint_at(n)` returns a staging directory when the state after n completed steps must be saved;
        the save is queued on every worker right behind that step, so each saves exactly that state. A step or
        save that fails or outruns its bound (recovery/deadlines.py) raises PipelineFailure, blamed on the
        worker that failed first. Once `stop` is requested no further step is queued: the loop ends after the
        steps already queued, or raises GraceExpired when they outrun the stop's grace period.
        """
        queued: deque[_Queued] = deque()
        next_step = first
        self.deadlines.restart()
        self.deadlines.waiting()
        while True:
            # Keep a few steps queued so that no worker ever idles waiting for the driver.
            while next_step < last and len(queued) < _STEPS_QUEUED_AHEAD and not (stop and stop.requested):
                queued.append(self._queue(next_step, checkpoint_at(next_step + 1)))
                next_step += 1
            if not queued:
                return
            entry = queued[0]
            later = [c for q in list(queued)[1:] for c in q.calls()]
            results = self._collect(entry.train, self.deadlines.step_bound(), stop, also=entry.save + later)
            self.deadlines.step_done()
            if entry.save:
                self._collect(entry.save, self.deadlines.save_bound(), stop, also=later)
            queued.popleft()
            self.deadlines.waiting()
            yield StepReport(entry.step, list(results.values()), entry.directory)

    def _queue(self, step: int, directory: Path | None) -> _Queued:
        train = self._calls("train_step", "train_step", step, step)
        save = self._calls("save_checkpoint", "save_checkpoint", step + 1, str(directory)) if directory else []
        return _Queued(step, train, save, directory)

    def _collect(self, calls: list[Call], bound_s: float, stop: StopSignals | None = None,
                 also: list[Call] = ()) -> dict[str, Any]:
        """Wait for `calls` (one per worker), at most `bound_s`; {label: result}. On a failure or a hang, probe
        every worker and raise PipelineFailure blaming the one that failed first (`also`: the calls queued
        behind these, which show where a worker that ran ahead failed). Waits in slices of a second, so that a
        stop signal's grace period is kept to the second."""
        deadline = time.monotonic() + bound_s
        pending = {c.ref: c for c in calls}
        results: dict[str, Any] = {}
        while pending:
            now = time.monotonic()
            if stop is not None and stop.deadline is not None and now >= stop.deadline:
                raise GraceExpired(f"waiting on {', '.join(c.label for c in pending.values())}")
            if now >= deadline:
                self._fail([*pending.values(), *also], None, bound_s)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(1.0, deadline - now))
            for ref in ready:
                call = pending.pop(ref)
                try:
                    results[call.label] = get_result(call.label, ref)
                except WorkerFailedError as err:
                    self._fail([call, *pending.values(), *also], err, None)
        return {c.label: results[c.label] for c in calls}

    def _fail(self, calls: list[Call], trigger: WorkerFailedError | None, bound_s: float | None) -> None:
        failure, error = diagnose(self.groups, calls, self.where, self.cfg.runtime.health_timeout_s, trigger, bound_s)
        raise PipelineFailure(failure) from (error or trigger)

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
    return record
