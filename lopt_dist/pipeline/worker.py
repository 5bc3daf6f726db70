"""The worker side of a worker group: the base class every group's actor class inherits, and its rank.

The contract in full:
- subclass `WorkerBase` and leave its names alone (`rank_info`, `device_view`, `torch_device`, `claim_device`,
  `init_torch_distributed`, `take_listener`, and the underscored methods the group calls);
- `__init__` takes the group's `init_args`/`init_kwargs`, runs before the rank is known and must not start
  CUDA: the group sets CUDA_VISIBLE_DEVICES after `__init__` (see `_set_device_view`), and CUDA reads it
  only when it starts. Build models in a method the driver calls after `WorkerGroup.create`;
- the driver calls methods by their real names (`execute("step", ...)`); nothing is bound by reflection;
- each worker runs one call at a time (Ray's default), in the order the driver sent them; except methods a
  subclass puts in a concurrency group it declares in `concurrency_groups` (`@ray.method(concurrency_group=
  CONTROL_GROUP)`), which run on a thread of their own, e.g. a status probe that answers while a step blocks.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass

import ray

from lopt_dist.device import DeviceView, Slot, gpu_sort_key

CONTROL_GROUP = "control"  # the concurrency group of methods that must answer while the worker is busy


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
    node_ip: str  # the node's cluster address: rendezvous stores listen on it
    gpu_ids: tuple[str, ...]  # the GPU ids Ray assigned this worker; () on CPU

    def slot(self, label: str = "") -> Slot:
        return Slot(self.node_id, self.gpu_ids, label)


def assign_ranks(infos: Sequence[NodeInfo]) -> list[tuple[int, RankInfo]]:
    """Order workers by node, then by GPU id, and number them: [(index into `infos`, its RankInfo)] by rank.

    Ranks are contiguous on a node, so local ranks and the ranks NCCL sees on one host agree. Nodes come in
    the order of their first worker, which puts rank 0 on the node of the first bundle. Nodes are told apart
    by Ray's node id, never by host name, which two containers on one host may share.
    """
    by_node: dict[str, list[int]] = {}
    for index, info in enumerate(infos):
        by_node.setdefault(info.node_id, []).append(index)
    ranked: list[tuple[int, RankInfo]] = []
    for members in by_node.values():
        members.sort(key=lambda i: (tuple(gpu_sort_key(g) for g in infos[i].gpu_ids), i))
        for local_rank, index in enumerate(members):
            info = infos[index]
            rank_info = RankInfo(rank=len(ranked), world_size=len(infos), local_rank=local_rank,
                                 local_world_size=len(members), node_id=info.node_id, node_ip=info.node_ip,
                                 gpu_ids=info.gpu_ids)
            ranked.append((index, rank_info))
    return ranked


class WorkerBase:
    """Base class of every class a WorkerGroup runs; it adds the few methods the group calls itself.

    Subclasses need not call `super().__init__()`.
    """

    _rank_info: RankInfo | None = None
    _device_view: DeviceView | None = None
    _listeners: dict | None = None
    # Ray concurrency groups (name -> threads) besides the default one, where the default runs one call at a time.
    concurrency_groups: dict[str, int] = {}

    @property
    def rank_info(self) -> RankInfo:
        if self._rank_info is None:
            raise RuntimeError("rank_info is set by WorkerGroup.create after __init__; it is not known in __init__")
        return self._rank_info

    @property
    def device_view(self) -> DeviceView:
        if self._device_view is None:
            raise RuntimeError("the device view is set by WorkerGroup.create after __init__")
        return self._device_view

    def torch_device(self):
        """This worker's torch device: cuda:<index into its CUDA_VISIBLE_DEVICES>, or cpu."""
        return self.device_view.torch_device()

    # ---- called by the group during start-up ----

    def _node_info(self) -> NodeInfo:
        gpu_ids = tuple(str(g) for g in ray.get_gpu_ids())
        node_id = ray.get_runtime_context().get_node_id()
        return NodeInfo(node_id=node_id, node_ip=ray.util.get_node_ip_address(), gpu_ids=gpu_ids)

    def _set_rank_info(self, info: RankInfo, view: DeviceView) -> None:
        self._rank_info = info
        self._set_device_view(view)

    def _set_device_view(self, view: DeviceView) -> None:
        """Show this worker's CUDA the GPUs of `view` (its own and its peers' on the node); before CUDA starts."""
        import torch

        if view.visible and torch.cuda.is_initialized():
            raise RuntimeError("CUDA started in this worker before its device view was set; start no CUDA in "
                               "__init__ (see lopt_dist.pipeline.worker)")
        if view.visible:
            os.environ["CUDA_VISIBLE_DEVICES"] = view.cuda_visible_devices
        self._device_view = view

    def _reserve_port(self) -> int:
        """A port listening on this node's cluster address, held until a store takes it (`take_listener`)."""
        from lopt_dist.transport.rendezvous import Listener

        listener = Listener(self.rank_info.node_ip)
        self._listeners = {**(self._listeners or {}), listener.port: listener}
        return listener.port

    def take_listener(self, port: int):
        """The socket `_reserve_port` opened for `port`, for the store this worker hosts on it."""
        listener = (self._listeners or {}).pop(port, None)
        if listener is None:
            raise RuntimeError(f"this worker reserved no port {port}; the store's master must be its reserver")
        return listener

    # ---- for subclasses ----

    def claim_device(self, threads: int):
        """This worker's torch device; on a CPU worker torch also gets `threads` threads, the CPUs Ray reserved
        for it, so workers sharing a node do not oversubscribe its cores."""
        import torch

        device = self.torch_device()
        if device.type == "cpu":
            torch.set_num_threads(threads)
        else:
            torch.cuda.set_device(device)
        return device

    def init_torch_distributed(
        self, master_addr: str, master_port: int, backend: str = "gloo", timeout_s: float = 1800.0
    ) -> None:
        """Join this group's torch.distributed default group; every worker of the group must call it at once.

        Rank 0 hosts the store on the port it reserved (bound to its node's address). The env variables are set
        because DeepSpeed reads them; LOCAL_RANK is the worker's device index on GPUs, since DeepSpeed selects
        cuda:LOCAL_RANK (the view may list a neighbouring stage's GPUs before this worker's own).
        """
        import torch.distributed as dist

        from lopt_dist.transport.rendezvous import make_store

        info = self.rank_info
        index = self.device_view.index
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(info.rank),
            WORLD_SIZE=str(info.world_size),
            LOCAL_RANK=str(info.local_rank if index is None else index),
            LOCAL_WORLD_SIZE=str(info.local_world_size),
        )
        if backend == "nccl":
            self.claim_device(1)
        timeout = datetime.timedelta(seconds=timeout_s)
        listener = self.take_listener(master_port) if info.rank == 0 else None
        store = make_store(master_addr, master_port, info.world_size, timeout, is_master=info.rank == 0,
                           listener=listener)
        dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size,
                                timeout=timeout)
