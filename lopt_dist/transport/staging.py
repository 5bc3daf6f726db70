"""CUDA tensors over a gloo boundary: staged through pinned host memory, one copy each way.

gloo moves CPU tensors. When a boundary's group is gloo but the workers compute on GPUs (peers sharing one
GPU, which NCCL cannot connect, or `runtime.transport: gloo`), the sender copies each tensor into pinned host
memory (an asynchronous device-to-host copy, then one wait for it before gloo reads the buffer) and the
receiver takes the bytes into pinned memory and copies them to its GPU asynchronously on its compute stream.
Pinned buffers come from torch's caching host allocator, so steady-state streaming allocates nothing new.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lopt_dist.transport.header import TensorMeta


def needs_staging(device_type: str, moves_cuda: bool) -> bool:
    """True when tensors on `device_type` must pass through host memory on a group that moves only CPU tensors."""
    return device_type == "cuda" and not moves_cuda


def to_wire(tensors: Sequence[torch.Tensor], moves_cuda: bool) -> list[torch.Tensor]:
    """The tensors to hand to the backend: the tensors themselves, or pinned host copies, complete on return."""
    if not tensors or not needs_staging(tensors[0].device.type, moves_cuda):
        return list(tensors)
    hosts = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
    for host, tensor in zip(hosts, tensors):
        host.copy_(tensor, non_blocking=True)
    # gloo reads the host buffers from its own threads: the copies must have landed before the send is posted.
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(tensors[0].device))
    done.synchronize()
    return hosts


def receive_buffers(metas: Sequence[TensorMeta], device: torch.device, moves_cuda: bool) -> list[torch.Tensor]:
    """Empty buffers for an incoming message: on `device`, or pinned host memory when it must be staged."""
    if needs_staging(device.type, moves_cuda):
        return [torch.empty(m.shape, dtype=m.dtype, pin_memory=True) for m in metas]
    return [torch.empty(m.shape, dtype=m.dtype, device=device) for m in metas]


def from_wire(buffers: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The received tensors on `device`; staged ones are copied up asynchronously on the current stream."""
    return [b if b.device == device else b.to(device, non_blocking=True) for b in buffers]
