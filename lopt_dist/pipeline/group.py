"""A group of Ray actors running one class side by side: the data-parallel workers of one stage.

A worker class inherits `WorkerBase` (worker.py). The group applies `ray.remote` itself, with the resources it
reserved, so pass the plain class:

    group = WorkerGroup.create(StageWorker, 2, name="stage 0", cpus_per_worker=1, gpus_per_worker=0,
                               init_args=(cfg,), start_timeout_s=60)
    group.execute("init_torch_distributed", group.master_addr, group.master_port, "gloo")
    refs = group.execute_async("step", batch)
    wait_all({**group.label_refs(refs), **other_group.label_refs(other_refs)})
    group.shutdown()

A lone group reserves its own placement group; a pipeline's groups share one (`placement=`, see placement.py),
which the pipeline releases.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ray
from ray.actor import ActorClass, ActorHandle

from lopt_dist.device import device_views
from lopt_dist.pipeline.errors import WorkerFailedError, WorkerGroupError, WorkerGroupStartError, WorkerTimeoutError
from lopt_dist.pipeline.futures import wait_all
from lopt_dist.pipeline.placement import GroupRequest, Placement, reserve
from lopt_dist.pipeline.worker import RankInfo, WorkerBase, assign_ranks

logger = logging.getLogger(__name__)


class WorkerGroup:
    """`num_workers` actors of one WorkerBase subclass, ranked by node and GPU.

    `actors[r]` and every list a method returns are in rank order. Make one with `create`.
    """

    def __init__(self, *, name: str, actor_cls: type, actors: list[ActorHandle], rank_infos: list[RankInfo],
                 placement: Placement | None, master_port: int) -> None:
        self.name = name
        self._actor_cls = actor_cls
        self._actors = actors
        self.rank_infos = tuple(rank_infos)
        self._placement = placement  # owned (released by shutdown) only when the group reserved it itself
        # Rendezvous for torch.distributed: rank 0's node address and a port rank 0 holds open on it.
        self.master_addr = rank_infos[0].node_ip
        self.master_port = master_port

    @classmethod
    def create(
        cls,
        actor_cls: type,
        num_workers: int,
        *,
        name: str,
        cpus_per_worker: float,
        gpus_per_worker: float = 0.0,
        init_args: tuple = (),
        init_kwargs: Mapping[str, Any] | None = None,
        start_timeout_s: float,
        runtime_env: Mapping[str, Any] | None = None,
        placement: tuple[Placement, int] | None = None,
        wait_for_gpus: bool = False,
    ) -> WorkerGroup:
        """Reserve the resources (unless `placement` = (a pipeline's Placement, this group's index) is given),
        start the actors, rank them, set their device views and reserve the rendezvous port.

        Raises WorkerGroupStartError at once when the request can never fit the cluster, after
        `start_timeout_s` when the resources stay taken, or when a worker fails while starting. Nothing the
        group reserved itself is left behind on failure.
        """
        _check_args(actor_cls, start_timeout_s)
        request = GroupRequest(name, num_workers, cpus_per_worker, gpus_per_worker)
        deadline = time.monotonic() + start_timeout_s
        owned = placement is None
        shared, index = placement if placement is not None else (None, 0)
        where = reserve([request], start_timeout_s, wait_for_gpus=wait_for_gpus) if owned else shared
        actors: list[ActorHandle] = []
        try:
            options = {"runtime_env": dict(runtime_env)} if runtime_env else {}
            if actor_cls.concurrency_groups:
                options["concurrency_groups"] = dict(actor_cls.concurrency_groups)
            # max_restarts=0: a worker that dies must surface as an error, not come back without its state.
            remote_cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0, **options)
            remote_cls = remote_cls(actor_cls)
            for worker in range(num_workers):
                placed_cls = remote_cls.options(scheduling_strategy=where.strategy(index, worker))
                actors.append(placed_cls.remote(*init_args, **(init_kwargs or {})))
            return cls._rank_workers(name, actor_cls, actors, where if owned else None, deadline)
        except BaseException:
            _kill(actors)
            if owned:
                where.release()
            raise

    @classmethod
    def _rank_workers(cls, name: str, actor_cls: type, actors: list[ActorHandle], placement: Placement | None,
                      deadline: float) -> WorkerGroup:
        # Until ranks exist, labels number workers by bundle.
        node_refs = {f"{name} worker {i}": a._node_info.remote() for i, a in enumerate(actors)}
        node_infos = _start_step(name, "reporting its node", node_refs, deadline)
        ranked = assign_ranks(node_infos)
        actors = [actors[index] for index, _ in ranked]
        rank_infos = [info for _, info in ranked]
        # Alone, a group shows each worker the group's GPUs on its node; a pipeline widens that (driver.py).
        views = device_views([r.slot() for r in rank_infos])
        set_refs = {f"{name} worker {r.rank}": a._set_rank_info.remote(r, v)
                    for a, r, v in zip(actors, rank_infos, views)}
        _start_step(name, "taking its rank", set_refs, deadline)
        port_ref = {f"{name} worker 0": actors[0]._reserve_port.remote()}
        [master_port] = _start_step(name, "reserving a port", port_ref, deadline)
        logger.info("started worker group %r: %s", name, [(r.node_ip, r.local_rank, r.gpu_ids) for r in rank_infos])
        return cls(name=name, actor_cls=actor_cls, actors=actors, rank_infos=rank_infos, placement=placement,
                   master_port=master_port)

    # ---- calling the workers ----

    def __len__(self) -> int:
        return len(self.rank_infos)

    @property
    def actors(self) -> tuple[ActorHandle, ...]:
        return tuple(self._live_actors())

    def label(self, rank: int) -> str:
        return f"{self.name} worker {rank}"

    def label_refs(self, refs: Sequence[ray.ObjectRef]) -> dict[str, ray.ObjectRef]:
        """{"<name> worker <rank>": ref} for one ref per worker in rank order, ready for `wait_all`."""
        if len(refs) != len(self):
            raise ValueError(f"worker group '{self.name}' has {len(self)} workers, got {len(refs)} refs")
        return {self.label(rank): ref for rank, ref in enumerate(refs)}

    def wait(self, refs: Sequence[ray.ObjectRef], timeout_s: float | None = None) -> list:
        return list(wait_all(self.label_refs(refs), timeout_s).values())

    def execute_async(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        """Call `method(*args, **kwargs)` on every worker; one ref per worker, in rank order."""
        return [self._method(actor, method).remote(*args, **kwargs) for actor in self._live_actors()]

    def execute(self, method: str, *args, **kwargs) -> list:
        """`execute_async`, then wait: results in rank order, WorkerFailedError on the first failure."""
        return self.wait(self.execute_async(method, *args, **kwargs))

    def execute_per_rank_async(self, method: str, args_per_rank: Sequence[tuple]) -> list[ray.ObjectRef]:
        """Call `method(*args_per_rank[r])` on worker r: each rank gets its own arguments (e.g. a data shard)."""
        if len(args_per_rank) != len(self):
            raise ValueError(f"worker group '{self.name}' has {len(self)} workers, got {len(args_per_rank)} arg tuples")
        actors = self._live_actors()
        return [self._method(actor, method).remote(*args) for actor, args in zip(actors, args_per_rank)]

    def execute_per_rank(self, method: str, args_per_rank: Sequence[tuple]) -> list:
        return self.wait(self.execute_per_rank_async(method, args_per_rank))

    def execute_single_async(self, rank: int, method: str, *args, **kwargs) -> ray.ObjectRef:
        return self._method(self._live_actors()[rank], method).remote(*args, **kwargs)

    def execute_single(self, rank: int, method: str, *args, **kwargs) -> Any:
        ref = self.execute_single_async(rank, method, *args, **kwargs)
        return wait_all({self.label(rank): ref})[self.label(rank)]

    def _live_actors(self) -> list[ActorHandle]:
        if not self._actors:
            raise WorkerGroupError(f"worker group '{self.name}' is shut down")
        return self._actors

    def _method(self, actor: ActorHandle, method: str):
        # Checked on the class so that a typo fails here, naming the class, not deep inside Ray.
        if not callable(getattr(self._actor_cls, method, None)):
            raise AttributeError(f"{self._actor_cls.__name__} (worker group '{self.name}') has no method {method!r}")
        return getattr(actor, method)

    # ---- shutting down ----

    def shutdown(self) -> None:
        """Kill every worker, even one that is busy, and free a reservation it made itself; safe to call twice."""
        actors, self._actors = self._actors, []
        _kill(actors)
        if self._placement is not None:
            self._placement.release()
            self._placement = None

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()


def _check_args(actor_cls: type, start_timeout_s: float) -> None:
    if isinstance(actor_cls, ActorClass):
        raise TypeError("pass the plain class to WorkerGroup.create; it applies ray.remote itself")
    if not (isinstance(actor_cls, type) and issubclass(actor_cls, WorkerBase)):
        raise TypeError(f"{actor_cls!r} must be a subclass of WorkerBase")
    if start_timeout_s <= 0:
        raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s}")


def _start_step(name: str, what: str, refs: dict[str, ray.ObjectRef], deadline: float) -> list:
    try:
        return list(wait_all(refs, timeout_s=max(0.0, deadline - time.monotonic())).values())
    except WorkerFailedError as err:
        raise WorkerGroupStartError(f"worker group '{name}' failed to start, {what}: {err}") from err
    except WorkerTimeoutError as err:
        late = ", ".join(err.waiting_on)
        raise WorkerGroupStartError(
            f"worker group '{name}' ran out of start-up time {what}; still waiting on {late}. "
            "A slow runtime_env or __init__ needs a longer start_timeout_s."
        ) from err


def _kill(actors: Sequence[ActorHandle]) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)
