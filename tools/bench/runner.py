"""Runs the benchmark's rows one after another on one Ray cluster, each in freshly started workers.

Rows never share a process, so every row's peak memory is its own and no row inherits another's warm caches.
A row that cannot run here (too few devices, sizes a schedule refuses) is skipped with the reason; a row whose
workers fail is reported as failed with the worker's error, and the other rows still run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import ray

from lopt_dist.device import cluster_uses_gpus
from lopt_dist.pipeline.errors import WorkerFailedError, WorkerGroupError
from lopt_dist.pipeline.futures import wait_all
from lopt_dist.pipeline.group import WorkerGroup

from .config import BenchConfig, BenchConfigError
from .env import load_average
from .experiment import zero2_deepspeed_config
from .lopt_dist_row import run_lopt_dist
from .measure import WorkerRecord
from .models import ModelInfo
from .pipeline_pp import PipelineWorker
from .plan import PlannedRow, plan_rows
from .single import SingleDeviceWorker
from .stage_alone import StageAloneWorker, StageTimes
from .zero_dp import DataParallelWorker

START_TIMEOUT_S = 600.0  # loading a model in several workers at once on a busy machine is slow


@dataclass(kw_only=True)
class RowRun:
    row: PlannedRow
    status: str  # "ok", "skipped", "failed"
    message: str | None = None
    details: str | None = None  # the failed worker's traceback, for the JSON
    records: list[WorkerRecord] = field(default_factory=list)
    stage_times: list[StageTimes] = field(default_factory=list)  # the stage-alone row only
    wall_s: float = 0.0  # start-up included
    load_average: tuple[list[float] | None, list[float] | None] = (None, None)  # before and after the row


@dataclass(kw_only=True)
class Cluster:
    gpu: bool
    gpus: int
    cpus: int
    started_here: bool


def connect(cfg: BenchConfig, verbose: bool) -> Cluster:
    """Attach to RAY_ADDRESS when set; else start a local Ray with enough CPUs for the largest row."""
    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=verbose)
        else:
            cpus = max(os.cpu_count() or 1, cfg.single_device_threads)
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=verbose)
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 0))
    if cfg.device == "cuda" and gpus == 0:
        raise BenchConfigError("--device: 'cuda' was asked but the Ray cluster has no GPU; use auto or cpu")
    gpu = cluster_uses_gpus(cfg.device, gpus)
    return Cluster(gpu=gpu, gpus=gpus, cpus=cpus, started_here=started)


def run_all(cfg: BenchConfig, model: ModelInfo, cluster: Cluster, progress: Callable[[str], None]) -> list[RowRun]:
    runs = []
    for row in plan_rows(cfg, model, cluster.gpu, cluster.gpus):
        if row.skip_reason:
            progress(f"{row.name}: skipped, {row.skip_reason}")
            runs.append(RowRun(row=row, status="skipped", message=row.skip_reason))
            continue
        progress(f"{row.name}: running ({row.layout})")
        run = _run_row(row, cfg, model, cluster.gpu)
        progress(f"{row.name}: {run.status} in {run.wall_s:.0f} s" + (f": {run.message}" if run.message else ""))
        runs.append(run)
    return runs


def _run_row(row: PlannedRow, cfg: BenchConfig, model: ModelInfo, gpu: bool) -> RowRun:
    start, load_before = time.perf_counter(), load_average()
    run = RowRun(row=row, status="ok")
    try:
        if row.kind == "lopt-dist":
            run.records = run_lopt_dist(cfg, model, gpu)
        elif row.kind == "stage-alone":
            [run.stage_times] = _run_group(StageAloneWorker, 1, row, cfg.threads_per_worker, gpu, (cfg, model))
        elif row.kind == "single-device":
            run.records = _run_group(SingleDeviceWorker, 1, row, cfg.single_device_threads, gpu,
                                     (cfg, model, row.method))
        elif row.kind == "pipeline":
            run.records = _run_group(PipelineWorker, cfg.workers, row, cfg.threads_per_worker, gpu,
                                     (cfg, model, row.schedule), distributed=True)
        else:
            ds_config = zero2_deepspeed_config(cfg, model, profile_comms=not gpu)
            run.records = _run_group(DataParallelWorker, cfg.workers, row, cfg.threads_per_worker, gpu,
                                     (cfg, model, ds_config), distributed=True)
    except WorkerFailedError as err:
        run.status, run.message, run.details = "failed", f"{err.label}: {err.error}", err.details
    except WorkerGroupError as err:  # could not start, or timed out
        run.status, run.message = "failed", str(err)
    run.wall_s, run.load_average = time.perf_counter() - start, (load_before, load_average())
    return run


def _run_group(actor_cls: type, workers: int, row: PlannedRow, cpus: int, gpu: bool, init_args: tuple,
               distributed: bool = False) -> list:
    """Start `workers` actors, set them up (joining one process group when `distributed`), run, shut down."""
    group = WorkerGroup.create(actor_cls, workers, name=row.name, cpus_per_worker=cpus, gpus_per_worker=float(gpu),
                               init_args=init_args, start_timeout_s=START_TIMEOUT_S)
    try:
        args = (group.master_addr, group.master_port, "nccl" if gpu else "gloo") if distributed else ()
        wait_all(group.label_refs(group.execute_async("setup", *args)), timeout_s=START_TIMEOUT_S)
        return list(wait_all(group.label_refs(group.execute_async("run"))).values())
    finally:
        group.shutdown()
