"""The boundary process group: a private link between the workers of two adjacent stages.

Each stage group trains with DeepSpeed over its own *default* torch.distributed group. The workers on
both sides of a stage boundary also join this second group, which torch's global bookkeeping never
sees (it is not the default group and not in `_world.pg_map`). So DeepSpeed's collectives and checkpoint
barriers can never include it, and activation traffic can never stall them. One world over both halves
deadlocks ZeRO-3 and checkpoint saves; see shared/notes/activation-transport.md for what was measured.

Rank layout for the boundary between stage s (n_s workers) and stage s+1 (n_t workers): ranks 0..n_s-1
are the stage-s workers by data-parallel rank, ranks n_s..n_s+n_t-1 the stage-(s+1) workers
(`routing.BoundaryLayout` computes them).

Before any backend is built, every member publishes its backend and device in the group's store and checks
everyone else's: members that disagree (a different backend, or NCCL asked for CPU workers or for two
workers on one GPU) fail at once with a message naming them, instead of hanging at the first send.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lopt_dist.transport.header import ChannelError
from lopt_dist.transport.rendezvous import Listener, find_free_port, make_store

BACKENDS = ("gloo", "nccl")

__all__ = ["BACKENDS", "BoundaryGroup", "create_boundary_group", "destroy_boundary_group", "find_free_port"]


@dataclass(frozen=True)
class BoundaryGroup:
    """A joined boundary group: the process group and how its data tensors travel.

    backend "nccl": CUDA tensors go device to device. "gloo": CPU tensors; CUDA tensors are staged through
    pinned host memory by the channel (peers sharing one GPU, or `runtime.transport: gloo` on GPUs).
    """

    pg: dist.ProcessGroup
    backend: str
    rank: int
    world_size: int
    name: str

    @property
    def moves_cuda(self) -> bool:
        return self.backend == "nccl"

    # Point-to-point calls go to the group object itself, not through torch.distributed's functions: those look
    # the group up in torch's registry, which this group is deliberately not in (torch 2.6 refuses it there).

    def isend(self, tensor: torch.Tensor, dst: int) -> dist.Work:
        """Post `tensor` for boundary rank `dst`; the backend is the one registered for the tensor's device."""
        return self.pg.send([tensor], dst, 0)

    def irecv(self, tensor: torch.Tensor, src: int) -> dist.Work:
        """Post a receive into `tensor` from boundary rank `src`."""
        return self.pg.recv([tensor], src, 0)


def create_boundary_group(
    store_host: str,
    store_port: int,
    rank: int,
    world_size: int,
    backend: str,
    timeout: datetime.timedelta,
    *,
    name: str = "boundary",
    device: torch.device | None = None,
    listener: Listener | None = None,
    bind_host: str | None = None,
) -> BoundaryGroup:
    """Join the boundary group; every rank must call this at about the same time (it rendezvouses).

    Rank 0 hosts the TCPStore at `store_host:store_port`, listening through `listener` when given (a socket it
    reserved on its node's address) or binding `store_host` itself. `name` prefixes every key in that store.
    `timeout` bounds the rendezvous and every later send or receive: a sender kept waiting by a paused
    receiver (e.g. one saving a checkpoint) longer than this fails. `bind_host`: this worker's own address, for
    gloo's connections (default: what the host name resolves to).

    With backend "nccl" data moves device to device, and CPU tensors (the channel's headers) still go over
    gloo; `device` (default: the current CUDA device) is made current before NCCL is set up.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a boundary group of {world_size} workers")
    if device is None:  # NCCL's default is the current CUDA device
        nccl = backend == "nccl" and torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    store = make_store(store_host, store_port, world_size, timeout, is_master=rank == 0, listener=listener)
    prefix_store = dist.PrefixStore(f"lopt-boundary/{name}/", store)
    _check_members(prefix_store, rank, world_size, backend, device, name, timeout)
    group = dist.ProcessGroup(prefix_store, rank, world_size)
    kind = dist.ProcessGroup.BackendType
    group._set_default_backend(kind.NCCL if backend == "nccl" else kind.GLOO)
    # Each backend gets its own key space under the boundary's prefix, as torch does for "cpu:gloo,cuda:nccl".
    gloo = _gloo_backend(dist.PrefixStore("cpu/", prefix_store), rank, world_size, timeout, bind_host)
    group._register_backend(torch.device("cpu"), kind.GLOO, gloo)
    if backend == "nccl":
        nccl = _nccl_backend(prefix_store, rank, world_size, timeout, device)
        group._register_backend(torch.device("cuda"), kind.NCCL, nccl)
    return BoundaryGroup(group, backend, rank, world_size, name)


def describe_device(device: torch.device | None) -> str:
    """"cpu", or "cuda:<UUID>": the physical GPU, whatever CUDA_VISIBLE_DEVICES numbers it in this process."""
    if device is None or device.type != "cuda":
        return "cpu" if device is None else device.type
    return f"cuda:{torch.cuda.get_device_properties(device).uuid}"


def _check_members(store: dist.Store, rank: int, world_size: int, backend: str, device: torch.device | None,
                   name: str, timeout: datetime.timedelta) -> None:
    store.set(f"member/{rank}", json.dumps({"backend": backend, "device": describe_device(device)}))
    keys = [f"member/{r}" for r in range(world_size)]
    store.wait(keys, timeout)
    members = [json.loads(store.get(key)) for key in keys]
    problem = members_problem(members)
    if problem:
        raise ChannelError(f"boundary {name}: {problem}")


def members_problem(members: list[dict]) -> str | None:
    """Why the members of one boundary group ({backend, device} by rank) cannot work together, or None."""
    backends = {m["backend"] for m in members}
    if len(backends) > 1:
        chose = "; ".join(f"rank {r}: {m['backend']}" for r, m in enumerate(members))
        return f"the two stages chose different transports ({chose}); every worker must decide alike"
    if backends == {"nccl"}:
        not_gpu = [r for r, m in enumerate(members) if not m["device"].startswith("cuda")]
        if not_gpu:
            return f"nccl was chosen but ranks {not_gpu} are not on a GPU"
        devices = [m["device"] for m in members]
        shared = sorted({d for d in devices if devices.count(d) > 1})
        if shared:
            ranks = [r for r, d in enumerate(devices) if d in shared]
            return f"nccl was chosen but ranks {ranks} share one GPU ({shared[0]}); NCCL needs a GPU per rank"
    return None


def _gloo_backend(store: dist.Store, rank: int, world_size: int, timeout: datetime.timedelta,
                  bind_host: str | None) -> dist.ProcessGroupGloo:
    if bind_host is None:
        return dist.ProcessGroupGloo(store, rank, world_size, timeout)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=bind_host)]
    return dist.ProcessGroupGloo(store, rank, world_size, options)


def _nccl_backend(
    prefix_store: dist.Store,
    rank: int,
    world_size: int,
    timeout: datetime.timedelta,
    device: torch.device | None,
) -> dist.ProcessGroupNCCL:
    if not dist.is_nccl_available():
        raise RuntimeError("backend 'nccl' asked for, but this torch build has no NCCL")
    # NCCL binds its communicators to the current device; set it first or rank 0's GPU gets them all.
    if device is not None:
        torch.cuda.set_device(device)
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = False
    options._timeout = timeout
    return dist.ProcessGroupNCCL(dist.PrefixStore("cuda/", prefix_store), rank, world_size, options)


def destroy_boundary_group(group: BoundaryGroup) -> None:
    """Release the group's connections (NCCL communicators in particular). Flush senders first."""
    if hasattr(group.pg, "shutdown"):  # newer torch; 2.6 has none
        group.pg.shutdown()
    elif group.moves_cuda:  # torch 2.6: shut NCCL down itself; gloo's connections close with the group
        group.pg._get_backend(torch.device("cuda")).shutdown()
