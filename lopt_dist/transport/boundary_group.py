"""The boundary process group: a private link between the workers of two adjacent stages.

Each stage group trains with DeepSpeed over its own *default* torch.distributed group. The workers on
both sides of a stage boundary also join this second group, which torch's global bookkeeping never
sees (it is not the default group and not in `_world.pg_map`). So DeepSpeed's collectives and checkpoint
barriers can never include it, and activation traffic can never stall them. One world over both halves
deadlocks ZeRO-3 and checkpoint saves; see shared/notes/activation-transport.md for what was measured.

Rank layout for the boundary between stage s (n_s workers) and stage s+1 (n_t workers): ranks 0..n_s-1
are the stage-s workers by data-parallel rank, ranks n_s..n_s+n_t-1 the stage-(s+1) workers
(`routing.BoundaryLayout` computes them).
"""

from __future__ import annotations

import datetime
import socket

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


def find_free_port() -> int:
    """A TCP port that is free on this node right now.

    Call it on the node of the boundary's rank 0 (the store's master), not on the driver, when they differ.
    The port could in principle be taken before the store binds it; every torch launcher accepts that race.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def pick_backend(transport: str) -> str:
    """Resolve `runtime.transport` ("auto", "gloo", "nccl") to a backend for `create_boundary_group`."""
    if transport == "auto":
        return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    if transport not in BACKENDS:
        raise ValueError(f"transport must be 'auto' or one of {BACKENDS}, got {transport!r}")
    return transport


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
) -> dist.ProcessGroup:
    """Join the boundary group; every rank must call this at about the same time (it rendezvouses).

    Rank 0 hosts the TCPStore at `store_host:store_port`; `name` names the boundary and prefixes every key
    the group puts in that store. `timeout` bounds the rendezvous and every later send or receive: a
    sender kept waiting by a paused receiver (e.g. one saving a checkpoint) longer than this fails.

    With backend "gloo" the group moves CPU tensors. With "nccl" it moves CUDA tensors device to device and
    still carries CPU tensors (the channel's small headers) over gloo; `device` (default: the current CUDA
    device) is made current before NCCL is set up. Works whether or not a default group exists.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a boundary group of {world_size} workers")
    store = dist.TCPStore(store_host, store_port, world_size, is_master=rank == 0, timeout=timeout)
    prefix_store = dist.PrefixStore(f"lopt-boundary/{name}/", store)
    group = dist.ProcessGroup(prefix_store, rank, world_size)
    kind = dist.ProcessGroup.BackendType
    group._set_default_backend(kind.NCCL if backend == "nccl" else kind.GLOO)
    # Each backend gets its own key space under the boundary's prefix, as torch does for "cpu:gloo,cuda:nccl".
    gloo = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", prefix_store), rank, world_size, timeout)
    group._register_backend(torch.device("cpu"), kind.GLOO, gloo)
    if backend == "nccl":
        nccl = _nccl_backend(prefix_store, rank, world_size, timeout, device)
        group._register_backend(torch.device("cuda"), kind.NCCL, nccl)
    return group


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


def destroy_boundary_group(group: dist.ProcessGroup) -> None:
    """Release the group's connections (NCCL communicators in particular). Flush senders first."""
    group.shutdown()
