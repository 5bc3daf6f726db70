"""Bringing a pipeline up: attach to (or start) Ray, reserve the placement, start one worker group per stage,
decide the transports from where the workers landed, and show each worker its devices; and bringing one
stage's group up again in the same placement after it failed (pipeline/stage_restart.py).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import time
from dataclasses import dataclass

import ray
from ray.exceptions import AuthenticationError

from lopt_dist.config import ConfigError, ExperimentConfig
from lopt_dist.device import DeviceView, Slot, boundary_backend, cluster_uses_gpus, device_views, group_backend
from lopt_dist.pipeline.futures import wait_all
from lopt_dist.pipeline.group import WorkerGroup
from lopt_dist.pipeline.placement import GroupRequest, Placement, reserve

logger = logging.getLogger(__name__)


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
        logger.info("starting an embedded local Ray")
        ray.init(address="local", num_cpus=cfg.runtime.ray_num_cpus, include_dashboard=False)
        return
    logger.info("attaching to the Ray cluster at %s (%s)", address, key)
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
    views: list[list[DeviceView]]  # what each worker's CUDA sees, by stage and rank

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
        views = _views(slots)
        _show_devices(groups, views)
    except BaseException:
        for group in groups:
            group.shutdown()
        placement.release()
        raise
    return Launched(groups, placement, gpu, group_backends, boundary_backends, views)


def relaunch_stage(cfg: ExperimentConfig, launched: Launched, stage: int, worker_cls: type,
                   extra_init_args: tuple = ()) -> WorkerGroup:
    """Start stage `stage`'s group again in its bundles of the pipeline's placement (the old group must be shut
    down: its workers free the bundles as they die; Ray moves bundles of a lost node elsewhere), and check that
    it landed where nothing decided at start changes: the same transports and the same device views everywhere.
    Replaces the group in `launched.groups`. Raises WorkerGroupStartError, or RuntimeError naming the change."""
    runtime = cfg.runtime
    g = runtime.groups[stage]
    group = WorkerGroup.create(
        worker_cls, g.workers, name=f"stage {stage}", cpus_per_worker=g.threads_per_worker,
        gpus_per_worker=runtime.gpus_per_worker if launched.gpu else 0.0, init_args=(cfg, stage, *extra_init_args),
        start_timeout_s=runtime.start_timeout_s, placement=(launched.placement, stage))
    try:
        groups = [group if i == stage else other for i, other in enumerate(launched.groups)]
        slots = [[r.slot(grp.label(r.rank)) for r in grp.rank_infos] for grp in groups]
        views = _views(slots)
        changed = [f"boundary {b}'s transport" for b in (stage - 1, stage) if 0 <= b < len(groups) - 1
                   and boundary_backend(b, runtime.transport, slots[b] + slots[b + 1]) != launched.boundary_backends[b]]
        changed += [f"stage {stage}'s group backend"] if group_backend(stage, slots[stage]) != \
            launched.group_backends[stage] else []
        changed += [f"the devices stage {i} sees" for i in range(len(groups)) if i != stage and views[i] !=
                    launched.views[i]]
        if changed:
            raise RuntimeError(f"stage {stage} restarted where {', '.join(changed)} would change")
        _show_devices([group], [views[stage]])
    except BaseException:
        group.shutdown()
        raise
    launched.groups[stage] = group
    launched.views[stage] = views[stage]
    return group


def _views(slots: list[list[Slot]]) -> list[list[DeviceView]]:
    """Each worker sees every pipeline GPU on its node (NCCL P2P to its peers), its own at its device index."""
    flat = iter(device_views([s for group_slots in slots for s in group_slots]))
    return [[next(flat) for _ in group_slots] for group_slots in slots]


def _show_devices(groups: list[WorkerGroup], views: list[list[DeviceView]]) -> None:
    refs = {}
    for group, group_views in zip(groups, views):
        args = [(view,) for view in group_views]
        refs.update(group.label_refs(group.execute_per_rank_async("_set_device_view", args)))
    wait_all(refs)
