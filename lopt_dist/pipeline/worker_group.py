"""A group of Ray actors running one class side by side: the data-parallel workers of one stage.

A worker class inherits `WorkerBase`. The group applies `ray.remote` itself, with the resources it
reserved, so pass the plain class:

    class StageWorker(WorkerBase):
        def __init__(self, cfg): ...          # leave CUDA alone here: see WorkerBase
        def step(self, batch): ...            # self.rank_info is set from the first call on

    group = WorkerGroup.create(StageWorker, 2, name="stage 0", cpus_per_worker=1, use_gpu=False,
                               init_args=(cfg,), start_timeout_s=60)
    group.execute("init_torch_distributed", group.master_addr, group.master_port, "gloo")
    refs = group.execute_async("step", batch)
    wait_all({**group.label_refs(refs), **other_group.label_refs(other_refs)})
    group.shutdown()

The contract in full:
- subclass `WorkerBase`, and leave its names alone (`rank_info`, `_rank_info`, `_node_info`,
  `_set_rank_info`, `_find_free_port`, `torch_device`, `init_torch_distributed`);
- `__init__` takes `init_args`/`init_kwargs`, runs before the rank is known and must not start CUDA;
- the driver calls methods by their real names (`execute("step", ...)`); nothing is bound by reflection;
- each worker runs one call at a time (Ray's default), in the order the driver sent them.

`wait_all` is a module function so that the driver can wait on the workers of several groups at once and
hear of the first failure at once, instead of blocking on a healthy worker that waits for the broken one.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.actor import ActorClass, ActorHandle
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from lopt_dist.pipeline.errors import (
    WorkerFailedError,
    WorkerGroupError,
    WorkerGroupStartError,
    WorkerTimeoutError,
)

logger = logging.getLogger(__name__)

_FIX_HINT = "Fix: ask for fewer workers or fewer CPUs (threads) per worker, or start a bigger cluster."


@dataclass(frozen=True)
class NodeInfo:
    """Where Ray placed one actor; the actor reports it, since only it knows the GPU ids it was given."""

    node_id: str
    node_ip: str
    gpu_ids: tuple[str, ...]


@dataclass(frozen=True)
class RankInfo:
    """A worker's place in its group, handed to it once, right after it is created."""

    rank: int
    world_size: int
    local_rank: int  # rank among this group's workers on the same node
    local_world_size: int
    node_id: str
    node_ip: str
    gpu_ids: tuple[str, ...]  # the GPU ids Ray assigned this worker; () on CPU
    node_gpu_ids: tuple[str, ...]  # the group's GPUs on this node in local-rank order; () on CPU


def assign_ranks(infos: Sequence[NodeInfo]) -> list[tuple[int, RankInfo]]:
    """Order workers by node, then by GPU id, and number them: [(index into `infos`, its RankInfo)] by rank.

    Ranks are contiguous on a node, so LOCAL_RANK and the ranks NCCL sees on one host agree. Nodes come in the
    order of their first worker, which puts rank 0 on the node of the first bundle. Nodes are told apart by
    Ray's node id, never by host name, which two containers on one host may share.
    """
    by_node: dict[str, list[int]] = {}
    for index, info in enumerate(infos):
        by_node.setdefault(info.node_id, []).append(index)
    ranked: list[tuple[int, RankInfo]] = []
    for members in by_node.values():
        members.sort(key=lambda i: (_gpu_sort_key(infos[i].gpu_ids), i))
        node_gpu_ids = tuple(gpu for i in members for gpu in infos[i].gpu_ids)
        for local_rank, index in enumerate(members):
            info = infos[index]
            rank_info = RankInfo(
                rank=len(ranked),
                world_size=len(infos),
                local_rank=local_rank,
                local_world_size=len(members),
                node_id=info.node_id,
                node_ip=info.node_ip,
                gpu_ids=info.gpu_ids,
                node_gpu_ids=node_gpu_ids,
            )
            ranked.append((index, rank_info))
    return ranked


def _gpu_sort_key(gpu_ids: tuple[str, ...]) -> tuple:
    # Ray gives GPU ids as integers, or as strings (UUIDs) when CUDA_VISIBLE_DEVICES lists them so; "10" must
    # come after "9".
    return tuple((0, int(g), "") if g.isdigit() else (1, 0, g) for g in gpu_ids)


class WorkerBase:
    """Base class of every class a WorkerGroup runs; it adds the few methods the group calls itself.

    Subclasses need not call `super().__init__()`. Touch no CUDA in `__init__`: when the group runs on GPUs,
    it rewrites CUDA_VISIBLE_DEVICES after `__init__` (see `_set_rank_info`), which CUDA only reads when it
    starts. Build models in a method the driver calls after `create`.
    """

    _rank_info: RankInfo | None = None

    @property
    def rank_info(self) -> RankInfo:
        if self._rank_info is None:
            raise RuntimeError("rank_info is set by WorkerGroup.create after __init__; it is not known in __init__")
        return self._rank_info

    def _node_info(self) -> NodeInfo:
        gpu_ids = tuple(str(g) for g in ray.get_gpu_ids())
        node_id = ray.get_runtime_context().get_node_id()
        return NodeInfo(node_id=node_id, node_ip=ray.util.get_node_ip_address(), gpu_ids=gpu_ids)

    def _set_rank_info(self, info: RankInfo) -> None:
        self._rank_info = info
        if info.node_gpu_ids:
            # Ray shows each actor only its own GPU. DeepSpeed selects cuda:LOCAL_RANK and NCCL wants to see
            # its peers on the node, so show the group's GPUs on this node, ordered so that index = local rank.
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(info.node_gpu_ids)

    def _find_free_port(self) -> int:
        # The port is free now, not reserved: another process could take it before rank 0 binds it.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            return sock.getsockname()[1]

    def torch_device(self):
        """cuda:local_rank on GPU workers (see `_set_rank_info`), cpu otherwise."""
        import torch

        info = self.rank_info
        return torch.device("cuda", info.local_rank) if info.gpu_ids else torch.device("cpu")

    def claim_device(self, threads: int):
        """This worker's torch device; on a CPU worker torch also gets `threads` threads, the CPUs Ray reserved
        for it, so workers sharing a node do not oversubscribe its cores."""
        import torch

        device = self.torch_device()
        if device.type == "cpu":
            torch.set_num_threads(threads)
        return device

    def init_torch_distributed(
        self, master_addr: str, master_port: int, backend: str = "gloo", timeout_s: float = 300.0
    ) -> None:
        """Join this group's torch.distributed default group; every worker of the group must call it at once.

        The env variables are set too because DeepSpeed reads RANK, WORLD_SIZE and LOCAL_RANK from them.
        """
        import torch
        import torch.distributed as dist

        info = self.rank_info
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(info.rank),
            WORLD_SIZE=str(info.world_size),
            LOCAL_RANK=str(info.local_rank),
            LOCAL_WORLD_SIZE=str(info.local_world_size),
        )
        if backend == "nccl":
            torch.cuda.set_device(self.torch_device())
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=info.rank,
            world_size=info.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )


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
            results[label] = _get_result(label, ref)
    return {label: results[label] for label in refs}


def _get_result(label: str, ref: ray.ObjectRef) -> Any:
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


class WorkerGroup:
    """`num_workers` actors of one WorkerBase subclass, one per placement-group bundle, ranked by node and GPU.

    `actors[r]` and every list a method returns are in rank order. Make one with `create`.
    """

    def __init__(
        self,
        *,
        name: str,
        actor_cls: type,
        actors: list[ActorHandle],
        rank_infos: list[RankInfo],
        pg: PlacementGroup,
        master_port: int,
    ) -> None:
        self.name = name
        self._actor_cls = actor_cls
        self._actors = actors
        self.rank_infos = tuple(rank_infos)
        self._pg: PlacementGroup | None = pg
        # Rendezvous for torch.distributed: rank 0's node and a port that was free there at start-up.
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
        use_gpu: bool,
        init_args: tuple = (),
        init_kwargs: Mapping[str, Any] | None = None,
        start_timeout_s: float,
        runtime_env: Mapping[str, Any] | None = None,
        strategy: str = "PACK",
    ) -> WorkerGroup:
        """Reserve the resources, start the actors, rank them and find the rendezvous port.

        Raises WorkerGroupStartError at once when the request can never fit the cluster, after
        `start_timeout_s` when the resources stay taken, or when a worker fails while starting. Nothing is left
        behind on failure.
        """
        _check_args(actor_cls, num_workers, cpus_per_worker, start_timeout_s)
        bundle = {"CPU": float(cpus_per_worker), "GPU": 1.0} if use_gpu else {"CPU": float(cpus_per_worker)}
        bundle = {key: amount for key, amount in bundle.items() if amount > 0}
        deadline = time.monotonic() + start_timeout_s
        pg = _reserve(name, num_workers, bundle, strategy, start_timeout_s)
        actors: list[ActorHandle] = []
        try:
            options = {"runtime_env": dict(runtime_env)} if runtime_env else {}
            # max_restarts=0: a worker that dies must surface as an error, not come back without its state.
            remote_cls = ray.remote(num_cpus=cpus_per_worker, num_gpus=int(use_gpu), max_restarts=0, **options)
            remote_cls = remote_cls(actor_cls)
            for index in range(num_workers):
                in_bundle = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)
                placed_cls = remote_cls.options(scheduling_strategy=in_bundle)
                actors.append(placed_cls.remote(*init_args, **(init_kwargs or {})))
            return cls._rank_workers(name, actor_cls, actors, pg, deadline)
        except BaseException:
            _kill(actors)
            remove_placement_group(pg)
            raise

    @classmethod
    def _rank_workers(
        cls, name: str, actor_cls: type, actors: list[ActorHandle], pg: PlacementGroup, deadline: float
    ) -> WorkerGroup:
        # Until ranks exist, labels number workers by bundle.
        node_refs = {f"{name} worker {i}": a._node_info.remote() for i, a in enumerate(actors)}
        node_infos = _start_step(name, "reporting its node", node_refs, deadline)
        ranked = assign_ranks(node_infos)
        actors = [actors[index] for index, _ in ranked]
        rank_infos = [info for _, info in ranked]
        set_refs = {f"{name} worker {r.rank}": a._set_rank_info.remote(r) for a, r in zip(actors, rank_infos)}
        _start_step(name, "taking its rank", set_refs, deadline)
        port_ref = {f"{name} worker 0": actors[0]._find_free_port.remote()}
        [master_port] = _start_step(name, "finding a free port", port_ref, deadline)
        logger.info("started worker group %r: %s", name, [(r.node_ip, r.local_rank, r.gpu_ids) for r in rank_infos])
        return cls(name=name, actor_cls=actor_cls, actors=actors, rank_infos=rank_infos, pg=pg, master_port=master_port)

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
        """Kill every worker, even one that is busy, and free the reservation; safe to call twice."""
        actors, self._actors = self._actors, []
        _kill(actors)
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()


def _check_args(actor_cls: type, num_workers: int, cpus_per_worker: float, start_timeout_s: float) -> None:
    if isinstance(actor_cls, ActorClass):
        raise TypeError("pass the plain class to WorkerGroup.create; it applies ray.remote itself")
    if not (isinstance(actor_cls, type) and issubclass(actor_cls, WorkerBase)):
        raise TypeError(f"{actor_cls!r} must be a subclass of WorkerBase")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if cpus_per_worker < 0:
        raise ValueError(f"cpus_per_worker must be >= 0, got {cpus_per_worker}")
    if start_timeout_s <= 0:
        raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s}")


def _reserve(name: str, num_workers: int, bundle: dict[str, float], strategy: str, timeout_s: float) -> PlacementGroup:
    """A ready placement group of `num_workers` bundles, or WorkerGroupStartError saying why not."""
    if not bundle:
        raise ValueError(f"worker group '{name}' asks for no resources per worker: give CPUs or use_gpu=True")
    asked = _describe_request(name, num_workers, bundle)
    shortfall = _never_fits(num_workers, bundle, strategy)
    if shortfall:  # fail fast: waiting cannot help
        raise WorkerGroupStartError(f"{asked}, but {shortfall}. {_describe_cluster()}. {_FIX_HINT}")
    pg = placement_group([bundle] * num_workers, strategy=strategy)
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except GetTimeoutError:
        remove_placement_group(pg)
        raise WorkerGroupStartError(
            f"{asked}, and did not get them within {timeout_s:g} s; other groups or tasks may hold them. "
            f"{_describe_cluster()}. {_FIX_HINT}"
        ) from None
    return pg


def _never_fits(num_workers: int, bundle: dict[str, float], strategy: str) -> str | None:
    """Why the request can never be met by the cluster as it is, or None when it could once resources free up."""
    total = ray.cluster_resources()
    for key, amount in bundle.items():
        if num_workers * amount > total.get(key, 0.0) + 1e-9:
            return f"the cluster has only {total.get(key, 0.0):g} {key}"
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    # STRICT_PACK puts every bundle on one node; the other strategies need each bundle to fit on some node.
    need = {k: v * num_workers for k, v in bundle.items()} if strategy == "STRICT_PACK" else bundle
    if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items()) for node in nodes):
        return f"no single node has {_format_resources(need)} ({strategy})"
    return None


def _describe_request(name: str, num_workers: int, bundle: dict[str, float]) -> str:
    total = {key: amount * num_workers for key, amount in bundle.items()}
    each = _format_resources(bundle)
    return f"worker group '{name}' asks for {num_workers} workers x ({each}) = {_format_resources(total)}"


def _describe_cluster() -> str:
    total, free = ray.cluster_resources(), ray.available_resources()
    in_all = _format_resources({key: total.get(key, 0.0) for key in ("CPU", "GPU")})
    free_now = _format_resources({key: free.get(key, 0.0) for key in ("CPU", "GPU")})
    return f"Cluster: {in_all} in all; {free_now} free now"


def _format_resources(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{amount:g} {key}" for key, amount in resources.items())


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
