"""The driver side of the decoupled pipeline: one worker group per stage, started, stepped and stopped together.

The driver queues every worker's `train_step` calls in order (Ray runs one actor's calls one after another)
and collects step k from all workers while later steps already run, so it never holds the pipeline back. A
worker that raises or dies fails the run at once, naming the worker and the step.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from lopt_dist.checkpoint.safetensors_io import Shard
from lopt_dist.config import ConfigError, ExperimentConfig
from lopt_dist.pipeline.deepspeed_engine import deepspeed_config
from lopt_dist.pipeline.errors import WorkerFailedError, WorkerGroupStartError
from lopt_dist.pipeline.stage_worker import BoundaryAddress, StageWorker, WorkerStepStats
from lopt_dist.pipeline.worker_group import WorkerGroup, wait_all
from lopt_dist.telemetry.memory import step_peak_bytes
from lopt_dist.transport import pick_backend

logger = logging.getLogger(__name__)

_STEPS_QUEUED_AHEAD = 2


def connect_ray(cfg: ExperimentConfig) -> None:
    """Attach to `runtime.ray_address` / RAY_ADDRESS when given, else start an embedded local instance."""
    if ray.is_initialized():
        return
    address = cfg.runtime.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=cfg.runtime.ray_num_cpus, include_dashboard=False)


def use_gpus(cfg: ExperimentConfig) -> bool:
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.runtime.device == "cuda" and gpus == 0:
        raise ConfigError("runtime.device: 'cuda' was asked but the Ray cluster has no GPUs; use 'auto' or 'cpu'")
    return cfg.runtime.device == "cuda" or (cfg.runtime.device == "auto" and gpus > 0)


def check_cluster_fits(cfg: ExperimentConfig, gpu: bool) -> None:
    """All groups together must fit; say what was asked against what the cluster has."""
    groups = cfg.runtime.groups
    want_cpu = sum(g.workers * g.threads_per_worker for g in groups)
    want_gpu = sum(g.workers for g in groups) if gpu else 0
    have = ray.cluster_resources()
    have_cpu, have_gpu = have.get("CPU", 0), have.get("GPU", 0)
    if want_cpu > have_cpu or want_gpu > have_gpu:
        asked = ", ".join(f"stage {i}: {g.workers} workers x {g.threads_per_worker} CPU" for i, g in enumerate(groups))
        raise WorkerGroupStartError(
            f"the worker groups need {want_cpu:g} CPUs{f' and {want_gpu} GPUs' if gpu else ''} ({asked}) but the "
            f"Ray cluster has {have_cpu:g} CPUs and {have_gpu:g} GPUs. Fix: fewer workers or threads_per_worker "
            "in runtime.groups, or a bigger cluster (embedded runs: runtime.ray_num_cpus)"
        )


@dataclass
class StepReport:
    step: int
    workers: list[WorkerStepStats]  # every worker of every stage, stage-major
    checkpoint: Path | None = None  # staged checkpoint of the state after this step, to commit


class PipelineDriver:
    def __init__(self, cfg: ExperimentConfig, groups: list[WorkerGroup]) -> None:
        self.cfg = cfg
        self.groups = groups

    @classmethod
    def start(cls, cfg: ExperimentConfig, worker_cls: type[StageWorker] = StageWorker,
              extra_init_args: tuple = ()) -> PipelineDriver:
        """Start one group per stage, wire the boundaries and build every engine.

        `worker_cls` / `extra_init_args`: a `StageWorker` subclass and what its constructor takes after
        `(cfg, stage_index)` (the benchmark's instrumented worker uses this).
        """
        ds_configs = [deepspeed_config(cfg, g, f"runtime.groups[{i}].deepspeed_config")
                      for i, g in enumerate(cfg.runtime.groups)]
        connect_ray(cfg)
        gpu = use_gpus(cfg)
        check_cluster_fits(cfg, gpu)
        if cfg.runtime.transport == "nccl" and not gpu:
            raise ConfigError("runtime.transport: 'nccl' moves GPU tensors, but this run has no GPUs; use 'auto' or 'gloo'")
        backend = pick_backend(cfg.runtime.transport if gpu else "gloo")
        groups: list[WorkerGroup] = []
        try:
            for i, g in enumerate(cfg.runtime.groups):
                groups.append(WorkerGroup.create(
                    worker_cls, g.workers, name=f"stage {i}", cpus_per_worker=g.threads_per_worker, use_gpu=gpu,
                    init_args=(cfg, i, *extra_init_args), start_timeout_s=cfg.runtime.start_timeout_s,
                ))
            # Boundary b's store lives on stage b's worker 0, on a port free on that node.
            addresses = [BoundaryAddress(g.master_addr, g.execute_single(0, "_find_free_port")) for g in groups[:-1]]
            refs = {}
            for group, ds in zip(groups, ds_configs):
                setup = group.execute_async("setup", group.master_addr, group.master_port, addresses, backend, ds)
                refs.update(group.label_refs(setup))
            wait_all(refs, timeout_s=cfg.runtime.boundary_timeout_s)
        except BaseException:
            for group in groups:
                group.shutdown()
            raise
        return cls(cfg, groups)

    def _all(self, method: str, *args) -> dict[str, ray.ObjectRef]:
        refs = {}
        for group in self.groups:
            refs.update(group.label_refs(group.execute_async(method, *args)))
        return refs

    def steps(self, first: int, last: int, checkpoint_at: Callable[[int], Path | None]) -> Iterator[StepReport]:
        """Run steps [first, last); yield each step's report as soon as every worker has finished it.

        `checkpoint_at(n)` returns a staging directory when the state after n completed steps must be saved;
        the save is queued on every worker right behind that step, so each saves exactly that state.
        """
        queued: deque[tuple[int, dict, dict, Path | None]] = deque()
        next_step = first
        while queued or next_step < last:
            # Keep a few steps queued so that no worker ever idles waiting for the driver.
            while next_step < last and len(queued) < _STEPS_QUEUED_AHEAD:
                directory = checkpoint_at(next_step + 1)
                train = self._all("train_step", next_step)
                save = self._all("save_checkpoint", str(directory)) if directory else {}
                queued.append((next_step, train, save, directory))
                next_step += 1
            step, train, save, directory = queued.popleft()
            try:
                results = wait_all(train)
                wait_all(save)
            except WorkerFailedError as err:
                raise WorkerFailedError(err.label, f"in step {step}: {err.error}", err.details, died=err.died) from err
            yield StepReport(step, list(results.values()), directory)

    def save_checkpoint(self, directory: str) -> None:
        wait_all(self._all("save_checkpoint", directory))

    def load_checkpoint(self, directory: str) -> None:
        wait_all(self._all("load_checkpoint", directory))

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
        for group in self.groups:
            group.shutdown()
        self.groups = []


def summarize_step(report: StepReport, cfg: ExperimentConfig, wall_s: float) -> dict[str, Any]:
    """One metrics record: losses over all micro-batches of the step, and each worker's time split."""
    per_step = cfg.train.micro_batches_per_step
    record: dict[str, Any] = {"step": report.step, "step_seconds": wall_s}
    last = len(cfg.runtime.groups) - 1
    for stage in range(last + 1):
        loss = sum(w.loss_sum for w in report.workers if w.stage == stage) / per_step
        record["task_loss" if stage == last else f"recon_loss_{stage}"] = loss
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
