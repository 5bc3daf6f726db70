"""The device decision, in one place: which device a run, each worker and each stage boundary uses.

Every rule is a pure function of what was asked (`runtime.device`, `runtime.transport`) and of what the
process was given: whether CUDA is present (single process), or the GPU ids Ray assigned each worker (as the
worker itself reported them). Nothing here starts CUDA, so the rules are tested on a CPU with Ray's fake GPU
resources. The driver never looks at its own CUDA: under `ray job submit` it may run on a CPU-only head node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lopt_dist.config import ConfigError


def local_device(requested: str, cuda_available: bool) -> torch.device:
    """The single-process trainer's device (`runtime.mode: local`)."""
    if requested == "cuda" and not cuda_available:
        raise ConfigError("runtime.device: 'cuda' was asked but this machine has no CUDA device; use 'auto' or 'cpu'")
    if requested == "cuda" or (requested == "auto" and cuda_available):
        return torch.device("cuda")
    return torch.device("cpu")


def cluster_uses_gpus(requested: str, cluster_gpus: float) -> bool:
    """Whether the Ray pipeline's workers ask for GPUs.

    `cuda` asks for them even when the cluster has none now: an autoscaling cluster that starts at zero GPUs
    adds GPU nodes once the placement group asks, and the start waits `runtime.start_timeout_s` for them.
    `auto` goes by the GPUs the cluster has now.
    """
    if requested == "cuda":
        return True
    return requested == "auto" and cluster_gpus > 0


@dataclass(frozen=True)
class Slot:
    """Where one worker computes, as Ray placed it: a node, and the GPU ids Ray assigned it (none on CPU)."""

    node_id: str
    gpu_ids: tuple[str, ...]
    label: str = ""  # "stage 0 worker 1", for messages

    @property
    def is_gpu(self) -> bool:
        return bool(self.gpu_ids)

    @property
    def gpus(self) -> set[tuple[str, str]]:
        """The physical GPUs held, as (node, GPU id): Ray numbers GPUs per node."""
        return {(self.node_id, gpu) for gpu in self.gpu_ids}


@dataclass(frozen=True)
class DeviceView:
    """What a worker's CUDA sees: CUDA_VISIBLE_DEVICES, and which entry of it is the worker's own GPU."""

    visible: tuple[str, ...] = ()  # () on CPU workers
    index: int | None = None

    def torch_device(self) -> torch.device:
        return torch.device("cpu") if self.index is None else torch.device("cuda", self.index)

    @property
    def cuda_visible_devices(self) -> str:
        return ",".join(self.visible)


def device_views(slots: Sequence[Slot]) -> list[DeviceView]:
    """One view per slot: every GPU that any of `slots` holds on that slot's node, and the slot's own index.

    Give it every worker of the pipeline, so that a worker also sees its neighbouring stage's GPUs on its node
    (NCCL needs to see a peer's GPU to use P2P/NVLink to it). Ray itself shows each worker only its own GPU.
    Ids sort numerically ("10" after "9"); workers sharing a GPU (fractional GPUs) get the same index.
    """
    by_node: dict[str, set[str]] = {}
    for slot in slots:
        by_node.setdefault(slot.node_id, set()).update(slot.gpu_ids)
    views = []
    for slot in slots:
        if not slot.is_gpu:
            views.append(DeviceView())
            continue
        if len(slot.gpu_ids) != 1:
            raise ValueError(f"{slot.label or 'a worker'} holds GPUs {list(slot.gpu_ids)}; a stage worker uses one")
        visible = tuple(sorted(by_node[slot.node_id], key=gpu_sort_key))
        views.append(DeviceView(visible, visible.index(slot.gpu_ids[0])))
    return views


def gpu_sort_key(gpu: str) -> tuple:
    # Ray gives GPU ids as integers, or as strings (UUIDs) when CUDA_VISIBLE_DEVICES lists them so.
    return (0, int(gpu), "") if gpu.isdigit() else (1, 0, gpu)


def shared_gpus(slots: Sequence[Slot]) -> dict[tuple[str, str], list[str]]:
    """{(node, GPU id): labels} for every GPU that more than one of `slots` holds."""
    holders: dict[tuple[str, str], list[str]] = {}
    for slot in slots:
        for gpu in slot.gpus:
            holders.setdefault(gpu, []).append(slot.label)
    return {gpu: labels for gpu, labels in holders.items() if len(labels) > 1}


def group_backend(stage: int, slots: Sequence[Slot]) -> str:
    """The backend of one stage group's default (DeepSpeed) process group: nccl on GPUs, gloo on CPUs.

    NCCL cannot put two ranks of one communicator on one GPU, so a group whose workers share a GPU is refused.
    """
    if not all(slot.is_gpu for slot in slots):
        return "gloo"
    shared = shared_gpus(slots)
    if shared:
        (node, gpu), labels = next(iter(shared.items()))
        raise ConfigError(
            f"runtime.gpus_per_worker: {' and '.join(labels)} were placed on the same GPU ({gpu} on node "
            f"{node[:12]}); NCCL runs one rank of a group per GPU. Use gpus_per_worker: 1 for stage {stage}'s "
            "group of several workers, or one worker per group when stages share GPUs"
        )
    return "nccl"


def boundary_backend(boundary: int, requested: str, slots: Sequence[Slot]) -> str:
    """The backend of boundary `boundary`'s process group, from the devices of all its members (both stages).

    nccl where every member holds a GPU of its own; gloo otherwise: CPU workers, or peers sharing a GPU, which
    NCCL cannot connect (the channel then stages CUDA tensors through pinned host memory). An explicit
    `runtime.transport` that cannot work is refused with the reason.
    """
    if requested not in ("auto", "gloo", "nccl"):
        raise ConfigError(f"runtime.transport: must be 'auto', 'gloo' or 'nccl', got {requested!r}")
    on_cpu = [slot.label for slot in slots if not slot.is_gpu]
    shared = shared_gpus(slots)
    if requested == "nccl":
        if on_cpu:
            raise ConfigError(
                f"runtime.transport: 'nccl' moves GPU tensors, but {', '.join(on_cpu)} (boundary {boundary}) hold no "
                "GPU; use 'auto' or 'gloo'"
            )
        if shared:
            labels = next(iter(shared.values()))
            raise ConfigError(
                f"runtime.transport: 'nccl' cannot connect {' and '.join(labels)} (boundary {boundary}): they share "
                "one GPU. Use 'auto' (gloo through pinned host memory) or runtime.gpus_per_worker: 1"
            )
        return "nccl"
    if requested == "gloo":
        return "gloo"
    return "gloo" if on_cpu or shared else "nccl"
